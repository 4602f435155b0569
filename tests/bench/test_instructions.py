"""Reading callgrind's dump: the counts of the window between zeroing and dumping."""

import pytest

from bench.instructions import dumped_instructions

DUMP = b"""# callgrind format
version: 1
creator: callgrind-3.19.0
events: Ir
fl=(1) ceval.c
fn=(1) _PyEval_EvalFrameDefault
0 664567
summary: 664567
totals: 664567
"""


def test_the_window_is_read_from_the_dump_not_from_the_file_written_at_exit(tmp_path):
    out = tmp_path / "callgrind-daphne-memory.out"
    out.write_bytes(DUMP.replace(b"664567", b"999999999"))  # the whole run, at exit
    (tmp_path / "callgrind-daphne-memory.out.1").write_bytes(DUMP)
    assert dumped_instructions(out) == 664567


def test_a_missing_dump_is_an_error_not_a_zero(tmp_path):
    out = tmp_path / "callgrind-reference.out"
    out.write_bytes(DUMP)
    with pytest.raises(RuntimeError, match="no callgrind dump"):
        dumped_instructions(out)


def test_the_latest_of_several_dumps_is_read(tmp_path):
    """A server measured in several windows leaves one dump per window: ``.1`` to ``.10``
    and beyond, which sort as numbers, not as text."""
    out = tmp_path / "callgrind-daphne-memory.out"
    for number in range(1, 11):
        dump = DUMP.replace(b"664567", str(number).encode())
        (tmp_path / f"callgrind-daphne-memory.out.{number}").write_bytes(dump)
    assert dumped_instructions(out) == 10
