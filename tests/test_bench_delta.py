"""tools/bench/bench_delta.py measures what it says on a real model: every delta rebuilds its
target and the figures it prints are the files' real sizes."""

from __future__ import annotations

from pathlib import Path

from fleetlite.tools.bench.bench_delta import measure, print_table
from tests.delta_fixtures import int8_pair


def test_the_bench_measures_real_deltas(tmp_path: Path) -> None:
    base, target = int8_pair("scattered")
    row = measure("int8_classifier", "10% scattered", base, target, tmp_path)
    assert row.rebuilt
    assert row.full == len(target)
    assert 0 < row.tensors <= 0.15 * row.full and 0 < row.binary <= 0.15 * row.full
    assert row.xz > row.tensors  # a plain compressor is no substitute for the delta
    print_table([row])
