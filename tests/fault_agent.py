"""A device agent with one broken rule, for the conformance kit's own tests:
``python -m tests.fault_agent --break accept_expired run --config agent.yaml``.

It patches exactly one check of the agent's verification in this process, then runs the agent
CLI's ``main`` with the remaining arguments; nothing in the product knows about it.

Faults:
  accept_expired  the expiry check (step 7 of "Verification order and reason codes") always
                  passes: the agent verifies releases as if its time floor were 0
  pause_rebuild   a delta rebuild stops half-way and waits (FLEETLITE_TEST_PAUSE_MARKER names
                  the file it touches then), for a kill -9 mid-rebuild
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any


def _accept_expired() -> None:
    from fleetlite.agent import ota_machine

    real = ota_machine.verify_release

    def verify_release(envelope_bytes: bytes, **kwargs: Any) -> Any:
        kwargs["time_floor"] = 0.0  # nothing expires at or below 0: the expiry check passes
        return real(envelope_bytes, **kwargs)

    ota_machine.verify_release = verify_release  # type: ignore[assignment]


def _pause_rebuild() -> None:
    """Not a broken rule: a delta rebuild writes part of its output, touches the file named by
    FLEETLITE_TEST_PAUSE_MARKER and waits there, so a test can kill -9 the agent mid-rebuild."""
    import os
    import time
    from pathlib import Path

    from fleetlite.agent import delta_rebuild

    real = delta_rebuild.apply_delta
    marker = Path(os.environ["FLEETLITE_TEST_PAUSE_MARKER"])

    class Pausing:
        def __init__(self, out: Any) -> None:
            self.out = out
            self.written = 0

        def write(self, data: Any) -> int:
            written: int = self.out.write(data)
            self.written += written
            if self.written >= 4096:
                self.out.flush()
                marker.write_text(str(os.getpid()))
                while True:
                    time.sleep(1)
            return written

        def __getattr__(self, name: str) -> Any:
            return getattr(self.out, name)

    def apply_delta(base: Any, delta: Any, out: Any, **kwargs: Any) -> Any:
        return real(base, delta, Pausing(out), **kwargs)

    delta_rebuild.apply_delta = apply_delta  # type: ignore[assignment]


FAULTS: dict[str, Callable[[], None]] = {"accept_expired": _accept_expired,
                                         "pause_rebuild": _pause_rebuild}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fault_agent", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--break", dest="fault", required=True, choices=sorted(FAULTS))
    parser.add_argument("agent_args", nargs=argparse.REMAINDER,
                        help="the arguments of fleetlite-agent (e.g. run --config agent.yaml)")
    args = parser.parse_args(argv)
    FAULTS[args.fault]()
    from fleetlite.agent.cli import main as agent_main

    return agent_main(args.agent_args)


if __name__ == "__main__":
    sys.exit(main())
