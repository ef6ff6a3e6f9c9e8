"""The OTA receiver's state machine alone: its cost per chunk frame against the work any
receiver must do with that frame.

``python -m fleetlite.tools.bench.bench_ota_machine [--model-kib 16384] [--chunk-size 4096]
[--repeat 3] [--json]``

builds a signed release of ``heavy_mlp`` of about ``--model-kib`` KiB (as ``bench_rollout``
builds it), drives :func:`fleetlite.agent.ota_machine.handle` into its download (manifest
verified, free space answered, an empty chunk store opened), then feeds it every chunk frame
of the release in order, with no broker, disk or thread: the machine's own time.

The baseline, in the same run on the same frames: decoding each frame against the release's
chunk layout (header, bounds, CRC) and marking it in a chunk bitmap, which is what any
receiver does with a frame before it writes it. It prints microseconds per frame for both
(the fastest of ``--repeat`` runs) and the ratio machine / baseline.

No assertion on time. The run exits 1 if the machine does not reach the end of the download
(a ``Finalize`` action after the last frame) or asks for a chunk it was given.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from fleetlite.agent import ota_machine as m
from fleetlite.sdk.bundle import ReleaseBundle
from fleetlite.sdk.chunks import ChunkBitmap, ChunkLayout
from fleetlite.sdk.manifest import release_id
from fleetlite.sdk.trust import load_trusted_root
from fleetlite.sdk.version import BUILD_TIME, __version__
from fleetlite.tools.bench.bench_ota_transfer import DEVICE_CLASS, build, frames_of, write_root


def _downloading(bundle: ReleaseBundle, root: bytes, chunk_size: int
                 ) -> tuple[m.Receiver, ChunkLayout]:
    """A receiver in its download, nothing received yet."""
    job = m.JobSpec(release_id(bundle.envelope.payload), chunk_size)
    trust = m.Trust(root=load_trusted_root(root), device_class=DEVICE_CLASS,
                    agent_version=__version__, time_floor=BUILD_TIME)
    state, actions = m.handle(m.Receiver("bench-1"),
                              m.Start(job, trust, 0.0, bundle.envelope.to_json()))
    if state.phase != m.SPACE:
        raise SystemExit(f"the machine did not verify the manifest: {state.phase} {actions}")
    state, actions = m.handle(state, m.SpaceChecked())
    assert state.manifest is not None
    layout = ChunkLayout.from_manifest(state.manifest, chunk_size)
    state, actions = m.handle(state, m.DownloadOpened(ChunkBitmap(layout.counts), 0.0))
    if state.phase != m.DOWNLOADING:
        raise SystemExit(f"the machine did not start its download: {state.phase}")
    return state, layout


def run_machine(bundle: ReleaseBundle, root: bytes, chunk_size: int,
                frames: Sequence[bytes]) -> tuple[float, bool]:
    """Seconds to handle every frame, and whether the download ended cleanly."""
    state, _ = _downloading(bundle, root, chunk_size)
    requested = False
    finalized = False
    now = 0.0
    start = time.perf_counter()
    for payload in frames:
        now += 0.0001
        state, actions = m.handle(state, m.ChunkFrame(payload, now))
        for action in actions:
            requested |= isinstance(action, m.RequestChunks)
            finalized |= isinstance(action, m.Finalize)
    seconds = time.perf_counter() - start
    return seconds, finalized and not requested and state.phase == m.FINALIZING


def run_baseline(layout: ChunkLayout, frames: Sequence[bytes]) -> float:
    """Seconds to decode every frame and mark it received."""
    bitmap = ChunkBitmap(layout.counts)
    start = time.perf_counter()
    for payload in frames:
        chunk = layout.decode(payload)
        bitmap.set(chunk.file_index, chunk.index)
    seconds = time.perf_counter() - start
    assert bitmap.complete()
    return seconds


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fleetlite.tools.bench.bench_ota_machine",
        description="The OTA state machine's cost per chunk frame against decoding the frame "
                    "and marking it received.")
    parser.add_argument("--model-kib", type=int, default=16384, help="model size (default 16384)")
    parser.add_argument("--chunk-size", type=int, default=4096, help="chunk size (default 4096)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each; the fastest is printed (default 3)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fleetlite-bench-machine-") as tmp:
        work = Path(tmp)
        _, bundle = build(work, args.model_kib)
        root = write_root(work / "root.json").read_bytes()
    frames = frames_of(bundle, args.chunk_size)
    layout = ChunkLayout.from_manifest(bundle.manifest, args.chunk_size)
    machine_s, base_s = float("inf"), float("inf")
    ok = True
    for _ in range(max(1, args.repeat)):
        base_s = min(base_s, run_baseline(layout, frames))
        seconds, clean = run_machine(bundle, root, args.chunk_size, frames)
        machine_s = min(machine_s, seconds)
        ok &= clean
    n = len(frames)
    figures = {"frames": n, "chunk_size": args.chunk_size,
               "release_bytes": sum(f.length for f in bundle.manifest.files),
               "machine_us_per_frame": machine_s / n * 1e6,
               "baseline_us_per_frame": base_s / n * 1e6,
               "ratio": machine_s / base_s if base_s else float("nan"), "ok": ok}
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"{n} frames of {args.chunk_size} bytes ({figures['release_bytes']:,} bytes)")
        print(f"  baseline (decode + mark):  {figures['baseline_us_per_frame']:8.1f} us/frame")
        print(f"  machine (handle):          {figures['machine_us_per_frame']:8.1f} us/frame"
              f"   {figures['ratio']:.1f}x the baseline")
    if not ok:
        print("the machine did not end its download cleanly", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
