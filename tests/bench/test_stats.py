"""The sustained stream's accounting: what was lost, and where."""

from bench.stats import stream_figures


def test_a_loss_is_located_by_client_and_by_update():
    sent = {1: 0.0, 2: 0.1, 3: 0.2}
    everything = [(0.05, "task_update", 1), (0.15, "task_update", 2), (0.25, "task_update", 3)]
    missing_two = [(0.05, "task_update", 1), (0.2, "error", -1), (0.25, "task_update", 3)]
    figures = stream_figures(sent, sent, [everything, everything, missing_two])
    assert (figures["expected"], figures["delivered"], figures["lost"]) == (9, 8, 1)
    assert figures["clients_with_losses"] == 1
    assert figures["lost_seqs"] == {"2": 1}
    assert figures["other_messages"] == {"error": 1}
    assert figures["out_of_order"] == figures["duplicates"] == 0
