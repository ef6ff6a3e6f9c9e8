"""Run a Python child that reads one JSON request and writes one JSON reply, and judge its exit.

The model check (:mod:`fleetlite.sdk.runtime.isolated`) and the isolated profile
(:func:`fleetlite.agent.profiler.profile_model_isolated`) both load untrusted models in such a
child. A signal or a timeout becomes :class:`ModelCrashedError`, a non-zero exit or a reply
without ``"ok": true`` the error class the reply names; each caller words the messages. The
child is killed when the agent dies (:mod:`fleetlite.sdk.child_lifetime`).
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from fleetlite.sdk.child_lifetime import run_tied
from fleetlite.sdk.errors import FleetLiteError
from fleetlite.sdk.runtime.errors import ModelCrashedError


@dataclass(frozen=True)
class ChildFailures:
    """How one kind of child reports failure.

    The messages are ``str.format`` templates over ``origin``, ``timeout`` (seconds) and
    ``signal`` (e.g. ``SIGSEGV``); ``failed`` is used only when neither the reply nor stderr
    says what went wrong.
    """

    timed_out: str
    crashed: str
    failed: str
    error: type[FleetLiteError]
    # Error class names a reply may give as "kind"; others (or none) raise ``error``.
    kinds: Mapping[str, type[FleetLiteError]] = field(default_factory=dict)
    # A key whose value a successful reply must carry as a JSON object.
    required: Optional[str] = None


def run_json_child(
    command: Sequence[str],
    request: Mapping[str, Any],
    *,
    timeout: float,
    origin: str,
    failures: ChildFailures,
) -> dict[str, Any]:
    """Run ``command`` with ``request`` on stdin; return its JSON reply or raise the error
    ``failures`` names."""
    try:
        proc = run_tied(command, input=json.dumps(request).encode(), timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise ModelCrashedError(
            failures.timed_out.format(origin=origin, timeout=timeout)
        ) from exc
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        raise ModelCrashedError(failures.crashed.format(origin=origin, signal=name))
    try:
        reply: dict[str, Any] = json.loads(proc.stdout.decode() or "{}")
    except ValueError:
        reply = {}
    missing = failures.required is not None and not isinstance(
        reply.get(failures.required), dict
    )
    if proc.returncode != 0 or not reply.get("ok") or missing:
        message = reply.get("error") or proc.stderr.decode(errors="replace").strip()[-500:]
        error = failures.kinds.get(str(reply.get("kind")), failures.error)
        raise error(message or failures.failed.format(origin=origin))
    return reply
