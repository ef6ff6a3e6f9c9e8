"""The OTA part of ``fleetlite conformance``: build the releases of the hostile-release table and
drive a device through them with real installs over the broker.

The kit makes its own tiny model (the demo's intent classifier, generated in memory: nothing is
downloaded) and releases it under the dedicated name ``fleetlite-conformance``, so the models the
device really serves are never touched. It signs with the release key(s) the operator gives (the
device verifies against its root, so the kit must sign with keys that root trusts), serves each
release with its own :class:`~fleetlite.fleet.ota_publisher.ReleasePublisher` and sends
``ota_install`` through the probe. In this order:

1. the hostile releases (unsigned, an unknown signer, changed after signing, expired, another
   device class, an agent too old, a file over the size cap, served bytes that do not match the
   signed hash): each must end in a final ``ota/status`` with outcome ``rejected`` and its reason
   code, and ``ota_slots`` must show the model's active version unchanged;
2. a valid signed release: final ``installed``, and ``ota_slots`` shows it active;
3. an older and the same version again: ``rejected``/``rollback`` and ``no_change``/
   ``same_version``, the installed one still active;
4. clean-up: ``remove_model fleetlite-conformance``, so the device is left as found (its
   anti-rollback floor for that name stays, so the next run picks higher versions).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from fleetlite.fleet.broker_address import BrokerAddress, ssl_context
from fleetlite.fleet.errors import PublishError
from fleetlite.fleet.release_builder import build_release
from fleetlite.sdk import topics
from fleetlite.sdk.bundle import ReleaseBundle, bundle_from_bytes
from fleetlite.sdk.envelope import Envelope
from fleetlite.sdk.keys import SigningKey
from fleetlite.sdk.manifest import release_id as compute_release_id
from fleetlite.sdk.messages import CommandResponse, MessageError, OtaStatus

if TYPE_CHECKING:
    from fleetlite.fleet.conformance import Check, Probe

__all__ = ["MODEL_NAME", "run_ota_checks"]

MODEL_NAME = "fleetlite-conformance"
VERIFY = "Verification order and reason codes"
INSTALL = "OTA install"
COMMANDS = "fleetlite.command/1"
CHUNK_SIZE = 16384
# 2020-01-01: an expired release expires a day after this, before any device's time floor
EXPIRED_ISSUED = 1577836800
OTHER_CLASS = "fleetlite-conformance-no-such-class"
TOO_NEW_AGENT = "9999.0.0"
OVERSIZE_LENGTH = 300 * 1024 * 1024  # over the 256 MiB per-file cap


@dataclass(frozen=True)
class Served:
    """A release to offer the device: a bundle the publisher serves, or (a manifest no
    publisher can serve, e.g. a file over the cap) only the envelope, published retained."""

    release_id: str
    bundle: Optional[ReleaseBundle] = None
    envelope: bytes = b""


@dataclass(frozen=True)
class Hostile:
    name: str
    reason: str
    make: Callable[[ReleaseFactory, int], Served]


class ReleaseFactory:
    """Builds the kit's releases of ``fleetlite-conformance`` for one device class."""

    def __init__(self, keys: Sequence[SigningKey], device_class: str, workdir: Path) -> None:
        from fleetlite.fleet.intent_model import intent_classifier

        self.keys = list(keys)
        self.device_class = device_class
        built = intent_classifier(seed=20261204, steps=30)
        self.model = workdir / "fleetlite-conformance.tflite"
        self.model.write_bytes(built.tflite)
        self.vocab = workdir / "fleetlite-conformance.vocab.json"
        self.vocab.write_bytes(built.extra_files["intent_classifier.vocab.json"])
        self._issued = int(time.time())

    def build(self, version: int, *, keys: Optional[Sequence[SigningKey]] = None,
              device_classes: Optional[Sequence[str]] = None, issued: Optional[int] = None,
              expires_in: int = 30 * 86400, min_agent_version: str = "0.0.1") -> ReleaseBundle:
        if issued is None:
            self._issued += 1  # a fresh release id for every release of the run
            issued = self._issued
        return build_release([self.model], name=MODEL_NAME, version=version,
                             device_classes=list(device_classes or [self.device_class]),
                             vocab=self.vocab, issued=issued, expires_in=expires_in,
                             min_agent_version=min_agent_version, smoke_cases=1,
                             keys=self.keys if keys is None else keys)

    def served(self, bundle: ReleaseBundle) -> Served:
        return Served(bundle.release_id, bundle)

    def resigned(self, bundle: ReleaseBundle, payload: bytes,
                 keys: Sequence[SigningKey]) -> Served:
        """``payload`` as a release signed by ``keys`` (none: unsigned), served with the
        bundle's files when its manifest still parses, else as a bare manifest."""
        envelope = Envelope(bundle.envelope.payload_type, payload, ())
        for key in keys:
            envelope = envelope.sign(key)
        raw = envelope.to_json()
        try:
            return Served(compute_release_id(payload),
                          bundle_from_bytes(raw, bundle.files, origin="the kit's release"))
        except Exception:  # a manifest no publisher serves (over the caps): the envelope only
            return Served(compute_release_id(payload), envelope=raw)


def _edit_payload(bundle: ReleaseBundle, edit: Callable[[dict[str, Any]], None]) -> bytes:
    doc = json.loads(bundle.envelope.payload)
    edit(doc)
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _unsigned(f: ReleaseFactory, version: int) -> Served:
    bundle = f.build(version)
    return f.resigned(bundle, bundle.envelope.payload, ())


def _unknown_key(f: ReleaseFactory, version: int) -> Served:
    return f.served(f.build(version, keys=[SigningKey.generate(role="release")]))


def _tampered(f: ReleaseFactory, version: int) -> Served:
    bundle = f.build(version)
    payload = _edit_payload(bundle, lambda doc: doc.update(version=version + 1000))
    changed = Envelope(bundle.envelope.payload_type, payload, bundle.envelope.signatures)
    return Served(compute_release_id(payload),
                  bundle_from_bytes(changed.to_json(), bundle.files, origin="the kit's release"))


def _expired(f: ReleaseFactory, version: int) -> Served:
    return f.served(f.build(version, issued=EXPIRED_ISSUED + random.randrange(86400),
                            expires_in=86400))


def _other_class(f: ReleaseFactory, version: int) -> Served:
    return f.served(f.build(version, device_classes=[OTHER_CLASS]))


def _agent_too_old(f: ReleaseFactory, version: int) -> Served:
    return f.served(f.build(version, min_agent_version=TOO_NEW_AGENT))


def _oversize_file(f: ReleaseFactory, version: int) -> Served:
    bundle = f.build(version)

    def grow(doc: dict[str, Any]) -> None:
        doc["files"][0]["length"] = OVERSIZE_LENGTH

    return f.resigned(bundle, _edit_payload(bundle, grow), f.keys)


def _hash_mismatch(f: ReleaseFactory, version: int) -> Served:
    bundle = f.build(version)
    model = bundle.manifest.model.file
    data = bundle.files[model]
    tampered = bytes(b ^ 0x5A for b in data[:64]) + data[64:]  # same length, other bytes
    return Served(bundle.release_id,
                  dataclasses.replace(bundle, files={**bundle.files, model: tampered}))


HOSTILE: tuple[Hostile, ...] = (
    Hostile("an unsigned release is refused", "unsigned", _unsigned),
    Hostile("a release signed by an unknown key is refused", "untrusted_signer", _unknown_key),
    Hostile("a release changed after signing is refused", "bad_signature", _tampered),
    Hostile("an expired release is refused", "expired", _expired),
    Hostile("a release for another device class is refused", "wrong_device_class",
            _other_class),
    Hostile("a release for a newer agent is refused", "agent_too_old", _agent_too_old),
    Hostile("a file over the 256 MiB cap is refused", "oversize", _oversize_file),
    Hostile("served bytes not matching the signed hash are refused", "hash_mismatch",
            _hash_mismatch),
)


class OtaRunner:
    """Serves the kit's releases and installs them on the probe's device."""

    def __init__(self, probe: Probe, broker: BrokerAddress, timeout: float,
                 install_timeout: float) -> None:
        from fleetlite.fleet.ota_publisher import ReleasePublisher

        self.probe = probe
        self.timeout = timeout
        self.install_timeout = install_timeout
        self.publisher = ReleasePublisher(
            broker.host, broker.port, tls=ssl_context(broker), username=broker.username,
            password=broker.password,
            client_id=f"fleetlite-conformance-ota-{uuid.uuid4().hex[:8]}")

    def command(self, command: str, args: dict[str, Any]) -> tuple[Optional[CommandResponse],
                                                                   str]:
        """Send a command; the parsed response, or None and why."""
        command_id = f"conf-{uuid.uuid4().hex[:8]}"
        payload = json.dumps({"schema": "fleetlite.command/1", "id": command_id,
                              "command": command, "args": args}).encode()
        raw = self.probe.command(payload, command_id, self.timeout)
        if raw is None:
            return None, f"no response to {command} within {self.timeout:g} s"
        try:
            return CommandResponse.from_json(raw), ""
        except MessageError as exc:
            return None, f"the {command} response does not parse ({exc.code}: {exc})"

    def slots(self) -> tuple[Optional[dict[str, Any]], str]:
        """The kit model's entry of ``ota_slots`` ({} when the device has none)."""
        response, why = self.command("ota_slots", {})
        if response is None:
            return None, why
        if not response.ok:
            return None, f"ota_slots failed ({response.error_code}: {response.error})"
        models = response.result.get("models")
        if not isinstance(models, dict):
            return None, "the ota_slots result has no models object"
        entry = models.get(MODEL_NAME, {})
        return (entry if isinstance(entry, dict) else {}), ""

    def install(self, served: Served) -> tuple[Optional[OtaStatus], str]:
        """Serve ``served``, send ``ota_install`` and wait for the final status; the status, or
        None and why. The release is no longer served afterwards."""
        rid = served.release_id
        seen = self.probe.ota_mark()
        try:
            if served.bundle is not None:
                # as a controller serves: every chunk retained before the command
                self.publisher.serve(served.bundle, CHUNK_SIZE, timeout=self.timeout)
            else:
                self.probe.publish_retained(
                    topics.release_topic(rid, topics.RELEASE_MANIFEST), served.envelope)
            response, why = self.command("ota_install", {"release_id": rid,
                                                         "chunk_size": CHUNK_SIZE})
            if response is None:
                return None, why
            if not response.ok:
                return None, (f"ota_install was refused ({response.error_code}: "
                              f"{response.error})")
            # a device that refuses answers at once; one that took the release is given the
            # time of a whole install to say how it ended
            first = self.probe.wait_ota(rid, seen, self.timeout, final_only=False)
            if first is None:
                return None, f"no final status within {self.timeout:g} s"
            if first.final:
                return first, ""
            final = self.probe.wait_ota(rid, seen, self.install_timeout, final_only=True)
            if final is None:
                return None, (f"no final status within {self.install_timeout:g} s (last phase "
                              f"{first.phase})")
            return final, ""
        except PublishError as exc:
            return None, f"the kit could not serve the release: {exc}"
        finally:
            with contextlib.suppress(PublishError):
                self.publisher.stop_serving(rid, timeout=self.timeout)


def active_version(entry: dict[str, Any]) -> Optional[int]:
    """The version ``ota_slots`` shows active for the model (None: not serving)."""
    active = entry.get("active")
    slots = entry.get("slots")
    if isinstance(active, str) and isinstance(slots, dict) and isinstance(slots.get(active),
                                                                          dict):
        version = slots[active].get("version")
        return version if isinstance(version, int) else None
    return None


def highest_version(entry: dict[str, Any]) -> int:
    """The highest version the device knows for the model: releases above it are new."""
    versions = [entry.get("installed_version"), entry.get("seed_version")]
    slots = entry.get("slots")
    if isinstance(slots, dict):
        versions += [s.get("version") for s in slots.values() if isinstance(s, dict)]
    rejected = entry.get("rejected")
    if isinstance(rejected, list):
        versions += rejected
    return max([v for v in versions if isinstance(v, int) and not isinstance(v, bool)],
               default=0)


def _describe(status: OtaStatus) -> str:
    text = f"final {status.outcome}" + (f"/{status.reason}" if status.reason else "")
    return text + (f" ({status.message[:120]})" if status.message else "")


def _version_text(version: Optional[int]) -> str:
    return "none" if version is None else f"v{version}"


def run_ota_checks(probe: Probe, broker: BrokerAddress, keys: Sequence[SigningKey],
                   device_class: str, timeout: float, install_timeout: float,
                   done: Callable[[Check], None]) -> None:
    """Run the OTA checks, handing each to ``done`` as it ends."""
    from fleetlite.fleet.conformance import Check

    runner = OtaRunner(probe, broker, timeout, install_timeout)
    entry, why = runner.slots()
    if entry is None:
        done(Check("ota_slots answered", COMMANDS, False, why))
        return
    base = highest_version(entry)
    with tempfile.TemporaryDirectory(prefix="fleetlite-conformance-") as tmp:
        factory = ReleaseFactory(keys, device_class, Path(tmp))
        try:
            runner.publisher.start(timeout)
        except PublishError as exc:
            done(Check("the kit serves its releases", "OTA delivery", False, str(exc)))
            return
        try:
            _run(runner, factory, base, done, Check)
        finally:
            runner.publisher.close()


def _refusal(runner: OtaRunner, name: str, section: str, served: Served, outcome: str,
             reason: str, check: type[Check]) -> Check:
    before, why = runner.slots()
    if before is None:
        return check(name, section, False, why)
    final, why = runner.install(served)
    after, why_after = runner.slots()
    if final is None:
        return check(name, section, False, why)
    problems = []
    if (final.outcome, final.reason) != (outcome, reason):
        problems.append(f"expected {outcome}/{reason}, got {_describe(final)}")
    if after is None:
        problems.append(why_after)
    elif active_version(after) != active_version(before):
        problems.append(f"the active {MODEL_NAME} changed from "
                        f"{_version_text(active_version(before))} to "
                        f"{_version_text(active_version(after))}")
    if problems:
        return check(name, section, False, "; ".join(problems))
    return check(name, section, True, f"{outcome}/{reason}, active "
                 f"{_version_text(active_version(before))} unchanged")


def _run(runner: OtaRunner, factory: ReleaseFactory, base: int,
         done: Callable[[Check], None], check: type[Check]) -> None:
    for offset, hostile in enumerate(HOSTILE, start=1):
        # each its own version above anything the device knows: one wrongly installed
        # does not change what the next one tests
        done(_refusal(runner, hostile.name, VERIFY, hostile.make(factory, base + offset),
                      "rejected", hostile.reason, check))
    version = base + len(HOSTILE) + 1
    valid = factory.build(version)
    name = "a signed release installs"
    final, why = runner.install(factory.served(valid))
    after, why_after = runner.slots()
    if final is None:
        done(check(name, INSTALL, False, why))
    elif final.outcome != "installed":
        done(check(name, INSTALL, False, f"expected installed, got {_describe(final)}"))
    elif after is None:
        done(check(name, INSTALL, False, why_after))
    elif active_version(after) != version:
        done(check(name, INSTALL, False, f"final installed, but ota_slots shows "
                   f"{_version_text(active_version(after))} active, not v{version}"))
    else:
        done(check(name, INSTALL, True, f"{MODEL_NAME} v{version} installed and active"))
    installed = after is not None and active_version(after) == version
    later = [("an older version is refused", factory.build(version - 1), "rejected",
              "rollback"),
             ("the same version again is no change", factory.build(version), "no_change",
              "same_version")]
    for name, bundle, outcome, reason in later:
        if installed:
            done(_refusal(runner, name, VERIFY, factory.served(bundle), outcome, reason,
                          check))
        else:
            done(check(name, VERIFY, False, "not run: the signed release did not install"))
    name = f"clean-up: {MODEL_NAME} removed"
    response, why = runner.command("remove_model", {"model": MODEL_NAME})
    entry, why_after = runner.slots()
    if response is None:
        done(check(name, COMMANDS, False, why))
    elif not response.ok and (installed or response.error_code != "failed"):
        done(check(name, COMMANDS, False, f"remove_model failed ({response.error_code}: "
                   f"{response.error})"))
    elif entry is None:
        done(check(name, COMMANDS, False, why_after))
    elif active_version(entry) is not None:
        done(check(name, COMMANDS, False, f"ota_slots still shows "
                   f"{_version_text(active_version(entry))} active"))
    else:
        done(check(name, COMMANDS, True, "removed with remove_model; the device is left as "
                   "found (its anti-rollback floor for the name stays)"))
