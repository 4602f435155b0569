"""``python -m bench``: run, print the table, write the JSON (and the docs, if asked)."""

import asyncio
import shlex
import signal
import sys
from datetime import datetime
from pathlib import Path

from bench import report
from bench.config import RESULTS_DIR, Config, from_args
from bench.console import progress
from bench.runner import run_benchmark
from bench.servers import stop_all


async def _main(config: Config) -> dict:
    # SIGTERM cancels the run like Ctrl-C does, so every server is stopped on the way out.
    task = asyncio.current_task()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await run_benchmark(config)


def measure(config: Config) -> dict:
    try:
        return asyncio.run(_main(config))
    except (KeyboardInterrupt, asyncio.CancelledError):
        stop_all()
        progress("interrupted; every server started has been stopped")
        sys.exit(130)
    finally:
        stop_all()


def main(argv: list[str] | None = None) -> None:
    config = from_args(argv)
    config.command = shlex.join(
        ["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)]
    )
    if config.from_json:
        result = report.read_json(config.from_json)
    else:
        result = measure(config)
    print(report.text_table(result))
    if not config.from_json:
        output = config.output or RESULTS_DIR / f"{datetime.now():%Y%m%d-%H%M%S}.json"
        report.write_json(result, Path(output))
        progress(f"results written to {output}")
    if config.update_docs:
        report.update_docs(result)
        progress(f"figures written to {report.DOCS}")
    if any("errors" in entry["summary"] for entry in result["results"].values()):
        sys.exit(1)
