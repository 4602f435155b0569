"""The results as a table (stdout or Markdown), as JSON, and in docs/performance.md."""

import json
import math
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent.parent / "docs" / "performance.md"
BEGIN = "<!-- bench:begin (written by python -m bench --update-docs) -->"
END = "<!-- bench:end -->"

#: (scenario, key, label), in the order of the table.
ROWS = [
    ("connect", "connect_per_s", "connections/s"),
    ("connect", "connect_p99_ms", "handshake p99 ms"),
    ("connect", "rss_per_connection_kib", "RSS KiB per idle connection"),
    ("connect", "server_cpu_s", "server CPU s"),
    ("connect", "client_cpu_s", "client CPU s"),
    ("connect", "server_wait_s", "server waiting for a CPU s"),
    ("connect", "other_cpu_s", "other processes' CPU s"),
    ("fanout", "deliveries_per_s", "deliveries/s"),
    ("fanout", "fanout_s", "full fan-out s"),
    ("fanout", "change_deliveries_per_s", "deliveries/s from the saved change"),
    ("fanout", "change_fanout_s", "full fan-out from the saved change s"),
    ("fanout", "p50_ms", "latency p50 ms"),
    ("fanout", "p99_ms", "latency p99 ms"),
    ("fanout", "max_ms", "latency max ms"),
    ("fanout", "delivered", "delivered"),
    ("fanout", "server_cpu_s", "server CPU s"),
    ("fanout", "server_max_cpu_s", "busiest server process CPU s"),
    ("fanout", "server_wait_s", "server waiting for a CPU s"),
    ("fanout", "redis_cpu_s", "Redis CPU s"),
    ("fanout", "client_cpu_s", "client CPU s"),
    ("fanout", "other_cpu_s", "other processes' CPU s"),
    ("broadcast", "deliveries_per_s", "deliveries/s"),
    ("broadcast", "fanout_s", "full fan-out s"),
    ("broadcast", "p99_ms", "latency p99 ms"),
    ("broadcast", "delivered", "delivered"),
    ("broadcast", "recipients_ok", "recipients = clients"),
    ("broadcast", "server_cpu_s", "server CPU s"),
    ("broadcast", "server_max_cpu_s", "busiest server process CPU s"),
    ("broadcast", "server_wait_s", "server waiting for a CPU s"),
    ("sse", "deliveries_per_s", "deliveries/s"),
    ("sse", "fanout_s", "full fan-out s"),
    ("sse", "change_deliveries_per_s", "deliveries/s from the saved change"),
    ("sse", "change_fanout_s", "full fan-out from the saved change s"),
    ("sse", "p99_ms", "latency p99 ms"),
    ("sse", "delivered", "delivered"),
    ("sse", "server_cpu_s", "server CPU s"),
    ("sse", "server_max_cpu_s", "busiest server process CPU s"),
    ("sse", "server_wait_s", "server waiting for a CPU s"),
    ("sustained", "updates", "updates sent"),
    ("sustained", "update_rate", "updates/s achieved"),
    ("sustained", "failed", "update requests refused"),
    ("sustained", "delivered", "delivered"),
    ("sustained", "lost", "lost"),
    ("sustained", "clients_with_losses", "clients that missed an update"),
    ("sustained", "out_of_order", "out of order"),
    ("sustained", "p50_ms", "latency p50 ms"),
    ("sustained", "p99_ms", "latency p99 ms"),
    ("sustained", "max_ms", "latency max ms"),
    ("sustained", "change_p50_ms", "latency from the saved change p50 ms"),
    ("sustained", "change_p99_ms", "latency from the saved change p99 ms"),
    ("sustained", "change_max_ms", "latency from the saved change max ms"),
    ("sustained", "lag_s", "last delivery after last update s"),
    ("sustained", "server_cpu_s", "server CPU s"),
    ("sustained", "server_wait_s", "server waiting for a CPU s"),
    ("sustained", "redis_cpu_s", "Redis CPU s"),
    ("sustained", "client_cpu_s", "client CPU s"),
    ("sustained", "other_cpu_s", "other processes' CPU s"),
]


#: Figures shown as "value/whole", without a ratio.
PAIRED = {"delivered": "expected", "updates": "planned"}
#: Figures whose ratio to the reference means nothing.
NO_RATIO = frozenset({"other_cpu_s", "server_wait_s"})


def number(value: float) -> str:
    if math.isnan(value):
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def ratio(value: float) -> str:
    """Two significant digits, however small or large: 0.0043x, 0.43x, 4.3x, 430x."""
    if value >= 100:
        return f"{value:.0f}x"
    return f"{float(f'{value:.2g}'):g}x"


def cell(summary: dict[str, Any], reference: dict[str, Any] | None, key: str) -> str:
    if "skipped" in summary:
        return "skipped"
    if key not in summary:
        return ""
    value = summary[key]
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if key in PAIRED:
        return f"{value:,}/{summary.get(PAIRED[key], 0):,}"
    text = number(value)
    if key in NO_RATIO or not reference or "skipped" in reference:
        return text
    ref = reference.get(key)
    if isinstance(ref, int | float) and ref and not math.isnan(ref) and not math.isnan(value):
        text += f" ({ratio(value / ref)})"
    return text


def rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The header and body of the results table; ratios are to the reference's medians."""
    summaries = {label: entry["summary"] for label, entry in result["results"].items()}
    labels = list(summaries)
    body = []
    for scenario, key, name in ROWS:
        reference = summaries.get("reference", {}).get(scenario)
        cells = []
        for label in labels:
            summary = summaries[label].get(scenario)
            cells.append(
                cell(summary, reference if label != "reference" else None, key) if summary else ""
            )
        if any(cells):
            body.append([scenario, name, *cells])
    for label in labels:
        for error in summaries[label].get("errors", []):
            body.append(["error", "", *[error[:60] if x == label else "" for x in labels]])
    return ["scenario", "figure", *labels], body


def text_table(result: dict[str, Any]) -> str:
    header, body = rows(result)
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(
        f"Medians of {result['config']['repeats']} runs (counts: totals); "
        "(Nx) = the figure divided by the reference's."
    )
    return "\n".join(lines)


def markdown_table(result: dict[str, Any]) -> str:
    header, body = rows(result)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def without_nan(value: Any) -> Any:
    """JSON has no NaN: missing figures become null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: without_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_nan(v) for v in value]
    return value


def read_json(path: Path) -> dict[str, Any]:
    """Results written by ``write_json()``, with missing figures as NaN again."""

    def restore(value: Any) -> Any:
        if value is None:
            return math.nan
        if isinstance(value, dict):
            return {k: restore(v) for k, v in value.items()}
        if isinstance(value, list):
            return [restore(v) for v in value]
        return value

    return restore(json.loads(path.read_text()))


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(without_nan(result), indent=2) + "\n")


def code_line(code: dict[str, Any]) -> str:
    commit = str(code.get("commit", "unknown"))[:12]
    if code.get("source") == "commit":
        return f"Code: commit {commit}."
    changed = code.get("changed") or []
    return f"Code: the working tree at {commit}" + (
        f", with changes to {', '.join(changed)}." if changed else " (no changes to served files)."
    )


def sizes_line(config: dict[str, Any]) -> str:
    scenarios = config["scenarios"]
    sizes = []
    if {"connect", "fanout", "broadcast"} & set(scenarios):
        sizes.append(f"{config['clients']:,} WebSocket clients")
    if "sse" in scenarios:
        sizes.append(f"{config['sse_clients']:,} event streams")
    if "sustained" in scenarios:
        sizes.append(
            f"sustained {config['stream_rate']:g} updates/s for {config['stream_seconds']:g} s "
            f"to {config['stream_clients']} subscribers"
        )
    return f"Scenarios: {', '.join(scenarios)}; {'; '.join(sizes)}."


def docs_section(result: dict[str, Any]) -> str:
    m = result["machine"]
    c = result["config"]
    return "\n".join(
        [
            BEGIN,
            f"Measured {result['started']} with `{result['command']}` "
            f"({c['repeats']} runs of each target, interleaved; medians, except counts such "
            f"as delivered/expected, which are totals over the runs; ratios to the "
            f"reference in parentheses).",
            "",
            f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, "
            f"Python {m['python']}, Linux {m['kernel']}; "
            f"load average at the end {', '.join(f'{x:.2f}' for x in m['load_average'])}.",
            code_line(result.get("code", {})),
            sizes_line(c),
            "",
            markdown_table(result),
            END,
        ]
    )


def update_docs(result: dict[str, Any], path: Path = DOCS) -> None:
    """Replace the figures between the markers of docs/performance.md (or append them)."""
    text = path.read_text() if path.exists() else "# Performance\n"
    section = docs_section(result)
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
