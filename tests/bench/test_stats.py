"""The benchmark's accounting: fan-out times, and what a sustained stream lost, and where."""

import pytest

from bench.stats import fanout_figures, stream_figures


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


def test_a_fan_out_is_also_timed_from_the_saved_change():
    # The trigger was sent at 10.000 and the server saved the change at 10.004.
    logs = [[(10.006, "task_update", 2)], [(10.010, "task_update", 2), (10.02, "error", -1)]]
    figures = fanout_figures(10.0, logs, "task_update", changed=10.004)
    assert figures["delivered"] == 2 and figures["unexpected"] == 1
    assert figures["fanout_s"] == pytest.approx(0.010)
    assert figures["deliveries_per_s"] == pytest.approx(200)
    assert figures["change_fanout_s"] == pytest.approx(0.006)
    assert figures["change_deliveries_per_s"] == pytest.approx(2 / 0.006)
    assert "change_fanout_s" not in fanout_figures(10.0, logs, "task_update")
