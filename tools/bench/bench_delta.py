"""What a fine-tune costs on the wire as a delta update, against the full file.

``python -m fleetlite.tools.bench.bench_delta [--fraction 0.1] [--seed 14] [--json]``

For the project's LM (``fleet/lm/home_lm.tflite``, float32), its int8 build
(``home_lm_int8.tflite``) and an int8 classifier (``fleetlite.tools.models.int8_classifier``), it
makes a seeded fine-tune that changes ``--fraction`` of every weight tensor's values
(``fleetlite.tools.finetune_weights``, both spreads: whole rows, and values scattered uniformly)
and measures, in the same run:

- **full**: the new file's size, what a device downloads without a delta; and **xz**: that file
  compressed by xz (preset 6, as the deltas are), the floor a plain compressor sets;
- **tensors**: the delta by TFLite tensor buffers, and **binary**: the block-matching delta
  (``fleet/delta_diff.py``), each as bytes and as a share of the full size (the target is 15% or
  less for a 10% fine-tune), the time to build it, and the time to apply it on this machine
  (``sdk/delta.py``, streaming from and to files in a temporary directory) against the time to
  sha256 the full file, which a device spends on any download.

A last row is the real fine-tune of the project's LM, ``home_lm`` -> ``home_lm_v2``
(``tools/finetune_lm.py``: a training run, which moves every weight): what a delta gives when a
fine-tune does not leave most weights alone. Every delta is applied and compared with its target;
the run exits 1 if one does not rebuild it. No assertion on sizes or times: re-run it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from fleetlite.fleet.delta_diff import binary_ops, tensor_ops
from fleetlite.sdk.delta import KIND_BINARY, KIND_TENSORS, Op, apply_delta, encode_delta
from fleetlite.tools.finetune_weights import SPREADS, finetune_weights
from fleetlite.tools.models import int8_classifier

REPO = Path(__file__).resolve().parents[2]
LM_DIR = REPO / "fleet" / "lm"
TARGET = 0.15


@dataclass
class Row:
    model: str
    change: str
    full: int
    xz: int
    tensors: int
    binary: int
    tensors_build_s: float
    binary_build_s: float
    tensors_apply_s: float
    binary_apply_s: float
    sha256_full_s: float
    rebuilt: bool


def _timed_delta(kind: int, find: Callable[[bytes, bytes], list[Op]], base: bytes,
                 target: bytes) -> tuple[bytes, float]:
    started = time.perf_counter()
    delta = encode_delta(kind, base, target, find(base, target))
    return delta, time.perf_counter() - started


def _apply(workdir: Path, base: bytes, delta: bytes, target: bytes) -> tuple[float, bool]:
    (workdir / "base").write_bytes(base)
    (workdir / "delta").write_bytes(delta)
    started = time.perf_counter()
    with open(workdir / "base", "rb") as b, open(workdir / "delta", "rb") as d, \
            open(workdir / "out", "wb") as out:
        apply_delta(b, d, out)
    seconds = time.perf_counter() - started
    return seconds, (workdir / "out").read_bytes() == target


def measure(model: str, change: str, base: bytes, target: bytes, workdir: Path) -> Row:
    tensors, tensors_build = _timed_delta(KIND_TENSORS, tensor_ops, base, target)
    binary, binary_build = _timed_delta(KIND_BINARY, binary_ops, base, target)
    tensors_apply, ok_t = _apply(workdir, base, tensors, target)
    binary_apply, ok_b = _apply(workdir, base, binary, target)
    started = time.perf_counter()
    hashlib.sha256((workdir / "out").read_bytes()).hexdigest()
    sha_s = time.perf_counter() - started
    return Row(model, change, len(target), len(lzma.compress(target, preset=6)), len(tensors),
               len(binary), tensors_build, binary_build, tensors_apply, binary_apply, sha_s,
               ok_t and ok_b)


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%"


def print_table(rows: Sequence[Row]) -> None:
    print("| model | change | full | xz of full | tensor delta | binary delta | build (tensor / "
          "binary) | apply (tensor / binary) | sha256 of full |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r.model} | {r.change} | {_kib(r.full)} | {_kib(r.xz)} ({_pct(r.xz, r.full)}) "
              f"| {_kib(r.tensors)} ({_pct(r.tensors, r.full)}) "
              f"| {_kib(r.binary)} ({_pct(r.binary, r.full)}) "
              f"| {r.tensors_build_s:.2f} s / {r.binary_build_s:.2f} s "
              f"| {1000 * r.tensors_apply_s:.0f} ms / {1000 * r.binary_apply_s:.0f} ms "
              f"| {1000 * r.sha256_full_s:.0f} ms |")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fleetlite.tools.bench.bench_delta",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--fraction", type=float, default=0.1,
                        help="share of every weight tensor's values the fine-tune changes")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--json", action="store_true", help="print JSON rows instead")
    args = parser.parse_args(argv)
    models = {
        "home_lm (float32 LM)": (LM_DIR / "home_lm.tflite").read_bytes(),
        "home_lm_int8 (int8 LM)": (LM_DIR / "home_lm_int8.tflite").read_bytes(),
        "int8_classifier": int8_classifier().tflite,
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-delta-") as tmp:
        for name, base in models.items():
            for spread in SPREADS:
                target = finetune_weights(base, fraction=args.fraction, spread=spread,
                                          seed=args.seed)
                rows.append(measure(name, f"{100 * args.fraction:g}% {spread}", base, target,
                                    Path(tmp)))
        rows.append(measure("home_lm -> home_lm_v2", "real fine-tune (all weights)",
                            models["home_lm (float32 LM)"],
                            (LM_DIR / "home_lm_v2.tflite").read_bytes(), Path(tmp)))
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        print_table(rows)
        seeded = rows[:-1]
        best = max(min(r.tensors, r.binary) / r.full for r in seeded)
        print(f"\nlargest smaller-of-the-two delta for a seeded {100 * args.fraction:g}% "
              f"fine-tune: {100 * best:.1f}% of the full file (target: at most "
              f"{100 * TARGET:.0f}%)")
    bad = [f"{r.model} {r.change}" for r in rows if not r.rebuilt]
    if bad:
        print(f"a delta did not rebuild its target: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
