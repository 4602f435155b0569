"""Turning arrival times into figures, and many runs into one."""

import math
import statistics
from collections import Counter
from typing import Any

#: Counts that add up over updates and runs; every other number is a median.
SUMMED = frozenset(
    {
        "expected",
        "delivered",
        "lost",
        "clients_with_losses",
        "out_of_order",
        "duplicates",
        "unexpected",
        "failed",
        "planned",
        "updates",
    }
)

#: What a load client reduces a message to: arrival time, type, seq (-1 if none).
Arrival = tuple[float, str, int]


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list (the value that ``fraction`` reach)."""
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def latency_figures(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "p50_ms": percentile(ordered, 0.50) * 1000,
        "p99_ms": percentile(ordered, 0.99) * 1000,
        "max_ms": (ordered[-1] if ordered else math.nan) * 1000,
    }


def fanout_figures(
    published: float, logs: list[list[Arrival]], kind: str, changed: float | None = None
) -> dict[str, Any]:
    """One message to every client: how many got it, how fast, how late.

    ``published`` is the time just before the trigger request was sent; a client's latency
    is the arrival of its first message of type ``kind`` after that. ``changed``, where
    the trigger's answer tells it, is when the server saved the change: the fan-out from
    there leaves out the trigger request's own cost, the same for every server.
    """
    latencies, unexpected = [], 0
    for log in logs:
        firsts = [t for t, type_, _ in log if type_ == kind]
        unexpected += len(log) - len(firsts[:1])
        if firsts:
            latencies.append(firsts[0] - published)
    span = max(latencies, default=math.nan)
    figures = {
        "expected": len(logs),
        "delivered": len(latencies),
        "fanout_s": span,
        "deliveries_per_s": per_second(len(latencies), span),
        **latency_figures(latencies),
        "unexpected": unexpected,
    }
    if changed is not None:
        from_change = span + published - changed
        figures["change_fanout_s"] = from_change
        figures["change_deliveries_per_s"] = per_second(len(latencies), from_change)
    return figures


def per_second(count: int, seconds: float) -> float:
    return count / seconds if count and seconds > 0 else 0.0


def stream_figures(
    sent: dict[int, float], changed: dict[int, float], logs: list[list[Arrival]]
) -> dict[str, Any]:
    """A stream of updates to every client: what was lost, reordered, repeated, and when.

    ``sent`` maps each published ``seq`` to the time its trigger was sent, ``changed`` to
    the time the server saved the change (its ``updated_at``): latency from the change
    leaves out the time the trigger waited for the server.
    """
    latencies: list[float] = []
    from_change: list[float] = []
    duplicates = out_of_order = 0
    others: Counter[str] = Counter()
    last_arrival = 0.0
    for log in logs:
        seen: set[int] = set()
        highest = -1
        for arrival, type_, seq in log:
            if type_ != "task_update":
                others[type_] += 1
                continue
            if seq in seen:
                duplicates += 1
                continue
            if seq < highest:
                out_of_order += 1
            highest = max(highest, seq)
            seen.add(seq)
            if seq in sent:
                latencies.append(arrival - sent[seq])
                last_arrival = max(last_arrival, arrival)
            if seq in changed:
                from_change.append(arrival - changed[seq])
    expected = len(sent) * len(logs)
    missing = [set(sent).difference(s for _, t, s in log if t == "task_update") for log in logs]
    lost_seqs = Counter(seq for seqs in missing for seq in seqs)
    return {
        "expected": expected,
        "delivered": len(latencies),
        "lost": expected - len(latencies),
        # Where a loss was: one client's stall, or one update missed by everyone.
        "clients_with_losses": sum(1 for seqs in missing if seqs),
        "lost_seqs": {str(seq): count for seq, count in sorted(lost_seqs.items())[:20]},
        "other_messages": dict(others),
        "out_of_order": out_of_order,
        "duplicates": duplicates,
        **latency_figures(latencies),
        **{f"change_{k}": v for k, v in latency_figures(from_change).items()},
        "lag_s": last_arrival - max(sent.values()) if latencies else math.nan,
    }


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """One record from several: counts summed, flags all-true, other numbers' medians."""
    summary: dict[str, Any] = {}
    for key in dict.fromkeys(k for sample in samples for k in sample):
        values = [sample[key] for sample in samples if key in sample]
        if all(isinstance(v, bool) for v in values):
            summary[key] = all(values)
        elif all(isinstance(v, int | float) for v in values):
            finite = [v for v in values if not math.isnan(v)]
            if key in SUMMED:
                summary[key] = sum(values)
            else:
                summary[key] = statistics.median(finite) if finite else math.nan
        elif all(isinstance(v, dict) for v in values):
            merged: Counter[str] = Counter()
            for value in values:
                merged.update(value)
            summary[key] = dict(merged)
        elif all(isinstance(v, str) for v in values):
            summary[key] = values[0]
    return summary
