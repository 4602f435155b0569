"""The benchmark suite of the real-time layer (issue 4): ``python -m bench --help``."""
