"""The benchmark suite of the real-time layer: ``python -m bench --help``."""
