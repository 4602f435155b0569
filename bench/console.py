"""Progress lines on stderr, so that stdout carries only the results table."""

import sys


def progress(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)
