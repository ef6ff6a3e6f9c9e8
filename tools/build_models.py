"""Write FleetLite's fixture models, or check that committed ones match a fresh build.

python -m fleetlite.tools.build_models OUTDIR          write every model (+ vocabulary files)
python -m fleetlite.tools.build_models --check DIR     exit 1 unless DIR matches byte for byte
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from fleetlite.fleet.intent_model import DEFAULT_SEED
from fleetlite.tools.models import build_all


def expected_files(seed: int = DEFAULT_SEED) -> dict[str, bytes]:
    """File name -> content of a fresh build."""
    files: dict[str, bytes] = {}
    for model in build_all(seed):
        files.update(model.files())
    return files


def write_models(outdir: Path, seed: int = DEFAULT_SEED) -> list[Path]:
    """Build every model into ``outdir`` (created if needed); returns the paths written."""
    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in expected_files(seed).items():
        path = outdir / name
        path.write_bytes(content)
        written.append(path)
    return written


def check_models(directory: Path, seed: int = DEFAULT_SEED) -> list[str]:
    """Differences between ``directory`` and a fresh build; empty when they match.

    A ``.tflite`` file that the build does not produce counts as a difference (a stale fixture);
    other unrelated files are ignored.
    """
    expected = expected_files(seed)
    problems = []
    for name, content in expected.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.read_bytes() != content:
            problems.append(f"{path}: differs from a fresh build")
    if directory.is_dir():
        for path in sorted(directory.glob("*.tflite")):
            if path.name not in expected:
                problems.append(f"{path}: not produced by the build (stale?)")
    return problems


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fleetlite.tools.build_models",
        description="Build FleetLite's deterministic fixture models (no TensorFlow needed).",
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("outdir", nargs="?", type=Path, help="directory to write the models to")
    target.add_argument(
        "--check", metavar="DIR", type=Path, help="verify DIR holds exactly a fresh build"
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="model seed (%(default)s)")
    args = parser.parse_args(argv)

    if args.check is not None:
        problems = check_models(args.check, args.seed)
        if problems:
            for problem in problems:
                print(problem, file=sys.stderr)
            seed = "" if args.seed == DEFAULT_SEED else f" --seed {args.seed}"
            print(
                f"{len(problems)} fixture problem(s). Regenerate with: "
                f"python -m fleetlite.tools.build_models {args.check}{seed}",
                file=sys.stderr,
            )
            return 1
        print(f"{args.check}: all fixture models match a fresh build")
        return 0
    for path in write_models(args.outdir, args.seed):
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
