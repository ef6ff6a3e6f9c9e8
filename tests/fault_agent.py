"""A device agent with one broken rule, for the conformance kit's own tests:
``python -m tests.fault_agent --break accept_expired run --config agent.yaml``.

It patches exactly one check of the agent's verification in this process, then runs the agent
CLI's ``main`` with the remaining arguments; nothing in the product knows about it.

Faults:
  accept_expired  the expiry check (step 7 of "Verification order and reason codes") always
                  passes: the agent verifies releases as if its time floor were 0
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


FAULTS: dict[str, Callable[[], None]] = {"accept_expired": _accept_expired}


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
