"""Release bundles: read a signed release, sign it again, write it, show it.

A bundle is either a directory or a single ``.flb`` file (an uncompressed POSIX tar) holding
``manifest.json`` (the signed DSSE envelope of the manifest) and exactly the files the manifest
lists. Reading a ``.flb`` refuses links, directories, devices, unlisted, duplicate, absolute and
traversing member names before anything is read into memory.

Building a release from ``.tflite`` files runs the models, so it is fleet-side:
:mod:`fleetlite.fleet.release_builder`.
"""

from __future__ import annotations

import datetime as _dt
import io
import os
import stat
import tarfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Union

from fleetlite.sdk.envelope import Envelope
from fleetlite.sdk.errors import BundleError, UnsafeNameError, UpdateRejected
from fleetlite.sdk.keys import SigningKey, require_role
from fleetlite.sdk.manifest import FileEntry, Manifest, check_file_name, parse_manifest
from fleetlite.sdk.trust import Root
from fleetlite.sdk.verify import DEFAULT_LIMITS, Limits, verify_bytes, verify_release
from fleetlite.sdk.version import __version__

__all__ = [
    "BUNDLE_SUFFIX",
    "ENVELOPE_NAME",
    "ReleaseBundle",
    "bundle_from_bytes",
    "load_bundle",
    "sign_bundle",
]

PathArg = Union[str, "os.PathLike[str]"]

ENVELOPE_NAME = "manifest.json"
BUNDLE_SUFFIX = ".flb"


@dataclass(frozen=True, eq=False)
class ReleaseBundle:
    """A release in memory: its envelope, the manifest parsed from it, and its files.

    ``manifest`` is parsed but NOT verified; call :meth:`verify` with a trusted root.
    """

    envelope: Envelope
    manifest: Manifest
    files: Mapping[str, bytes]

    @property
    def release_id(self) -> str:
        return self.manifest.release_id

    def envelope_bytes(self) -> bytes:
        return self.envelope.to_json()

    def sign(self, key: SigningKey) -> ReleaseBundle:
        """Add ``key``'s signature over the exact payload (never re-serialised); a key whose
        role is not ``release`` is refused (:class:`KeyFileError`)."""
        require_role(key.role, "release", f"key {key.keyid[:12]}")
        return replace(self, envelope=self.envelope.sign(key))

    def verify(
        self,
        root: Root,
        *,
        device_class: str | None = None,
        time_floor: float | None = None,
        installed_version: int | None = None,
        agent_version: str = __version__,
        limits: Limits = DEFAULT_LIMITS,
    ) -> Manifest:
        """:func:`verify_release` on the envelope, then every file against its entry."""
        manifest = verify_release(
            self.envelope_bytes(),
            root=root,
            installed_version=installed_version,
            device_class=device_class,
            time_floor=time.time() if time_floor is None else time_floor,
            agent_version=agent_version,
            limits=limits,
        )
        for entry in manifest.files:
            verify_bytes(self.files.get(entry.name, b""), entry)
        return manifest

    def write_dir(self, directory: PathArg) -> Path:
        """Write ``manifest.json`` and the files into ``directory`` (created; must be empty)."""
        target = Path(directory)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise BundleError(f"{target}: exists and is not an empty directory; choose a new "
                              "--out directory")
        target.mkdir(parents=True, exist_ok=True)
        from fleetlite.sdk.atomic import write_atomic

        for entry in self.manifest.files:
            write_atomic(target / entry.name, self.files[entry.name])
        write_atomic(target / ENVELOPE_NAME, self.envelope_bytes())
        return target

    def flb_bytes(self) -> bytes:
        """The single-file form: a deterministic uncompressed tar, manifest.json first."""
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            members = [(ENVELOPE_NAME, self.envelope_bytes())]
            members += [(e.name, self.files[e.name]) for e in self.manifest.files]
            for name, content in members:
                info = tarfile.TarInfo(name)
                info.size = len(content)
                info.mode = 0o644
                info.mtime = self.manifest.issued
                tar.addfile(info, io.BytesIO(content))
        return buffer.getvalue()

    def write_flb(self, path: PathArg) -> Path:
        from fleetlite.sdk.atomic import write_atomic

        target = Path(path)
        write_atomic(target, self.flb_bytes())
        return target

    def summary(self, now: float | None = None) -> dict[str, Any]:
        """A JSON-ready description (unverified unless the caller verified it); times are UTC
        ISO 8601 and ``expired`` says whether ``expires`` has passed at ``now`` (default: the
        current time)."""
        m = self.manifest
        files = []
        for entry in m.files:
            try:
                verify_bytes(self.files.get(entry.name, b""), entry)
                status = "ok"
            except UpdateRejected as exc:
                status = exc.reason
            files.append({**entry.to_dict(), "status": status})
        return {
            "name": m.name,
            "version": m.version,
            "release_id": m.release_id,
            "issued": _iso(m.issued),
            "expires": _iso(m.expires),
            "expired": m.expires <= (time.time() if now is None else now),
            "device_classes": list(m.device_classes),
            "min_agent_version": m.min_agent_version,
            "signatures": [s.keyid for s in self.envelope.signatures],
            "files": files,
            "variants": [
                {"name": v.name, "file": v.model.file, "smoke": v.smoke.file,
                 "tolerance": v.smoke.tolerance.to_dict(),
                 "inputs": [t.to_dict() for t in v.model.inputs],
                 "outputs": [t.to_dict() for t in v.model.outputs]}
                for v in m.all_variants()
            ],
        }


def _iso(ts: int) -> str:
    return _dt.datetime.fromtimestamp(ts, tz=_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- reading ----------------------------------------------------------------------------------


def load_bundle(path: PathArg, *, limits: Limits = DEFAULT_LIMITS) -> ReleaseBundle:
    """Read a bundle directory or ``.flb`` file. Structure is checked; signatures are not."""
    source = Path(path)
    if source.is_dir():
        return _load_dir(source, limits)
    if source.is_file():
        return _load_flb(source, limits)
    raise BundleError(f"{source}: no such bundle (a directory with manifest.json or a .flb file)")


def bundle_from_bytes(envelope: bytes, files: Mapping[str, bytes], *, origin: str = "the release",
                      limits: Limits = DEFAULT_LIMITS) -> ReleaseBundle:
    """A bundle from its envelope bytes and file contents (e.g. a release kept in the fleet
    store). Structure is checked; signatures are not."""
    parsed, manifest = _parse_envelope(envelope, origin, limits)
    return ReleaseBundle(parsed, manifest, dict(files))


def _parse_envelope(data: bytes, origin: str, limits: Limits) -> tuple[Envelope, Manifest]:
    try:
        envelope = Envelope.from_json(data, max_bytes=limits.max_envelope_bytes,
                                      max_payload_bytes=limits.max_manifest_bytes,
                                      max_signatures=limits.max_signatures)
        manifest = parse_manifest(envelope.payload, max_bytes=limits.max_manifest_bytes,
                                  max_files=limits.max_files,
                                  max_file_bytes=limits.max_file_bytes)
    except UpdateRejected as exc:
        raise BundleError(f"{origin}: {exc} [{exc.reason}]") from None
    return envelope, manifest


def _read_capped(path: Path, cap: int) -> bytes:
    with path.open("rb") as handle:
        return handle.read(cap + 1)


def _load_dir(directory: Path, limits: Limits) -> ReleaseBundle:
    envelope_path = directory / ENVELOPE_NAME
    if not envelope_path.is_file() or envelope_path.is_symlink():
        raise BundleError(f"{directory}: no {ENVELOPE_NAME}; is this a release bundle?")
    envelope, manifest = _parse_envelope(
        _read_capped(envelope_path, limits.max_envelope_bytes), str(envelope_path), limits)
    listed = {e.name: e for e in manifest.files}
    for child in directory.iterdir():
        if child.name != ENVELOPE_NAME and child.name not in listed:
            raise BundleError(f"{child}: not listed in the manifest; remove it from the bundle")
    files: dict[str, bytes] = {}
    for entry in manifest.files:
        member = directory / entry.name
        try:
            info = member.lstat()
        except FileNotFoundError:
            raise BundleError(f"{member}: listed in the manifest but missing") from None
        if not stat.S_ISREG(info.st_mode):
            raise BundleError(f"{member}: not a regular file (links are refused)")
        # At most one byte past the signed length: enough for verification to refuse it.
        files[entry.name] = _read_capped(member, entry.length)
    return ReleaseBundle(envelope, manifest, files)


def _load_flb(path: Path, limits: Limits) -> ReleaseBundle:
    try:
        tar = tarfile.open(path, mode="r:")  # noqa: SIM115 - closed below
    # ValueError: tarfile's own parse of a pax header, e.g. size=nan (Python 3.11)
    except (tarfile.TarError, OSError, ValueError) as exc:
        raise BundleError(f"{path}: not a .flb bundle (an uncompressed tar): {exc}") from None
    with tar:
        try:
            first = tar.next()
            if first is None or first.name != ENVELOPE_NAME or not first.isreg():
                raise BundleError(f"{path}: the first member must be {ENVELOPE_NAME}")
            if first.size > limits.max_envelope_bytes:
                raise BundleError(f"{path}: {ENVELOPE_NAME} exceeds "
                                  f"{limits.max_envelope_bytes} bytes [oversize]")
            envelope, manifest = _parse_envelope(_extract(tar, first, first.size), str(path),
                                                 limits)
            listed = {e.name: e for e in manifest.files}
            files: dict[str, bytes] = {}
            while True:
                member = tar.next()
                if member is None:
                    break
                _check_member(path, member, listed, files)
                files[member.name] = _extract(tar, member, listed[member.name].length + 1)
        except (tarfile.TarError, ValueError) as exc:  # e.g. "unexpected end of data"
            raise BundleError(f"{path}: truncated or corrupt .flb ({exc}); copy it again or "
                              "rebuild it (fleetlite release build)") from None
        _check_archive_end(path, tar)
    missing = [name for name in listed if name not in files]
    if missing:
        raise BundleError(f"{path}: listed in the manifest but missing: {', '.join(missing)}")
    return ReleaseBundle(envelope, manifest, files)


def _check_archive_end(path: Path, tar: tarfile.TarFile) -> None:
    """After the last member: the two zero blocks that end a tar, then nothing but the zero
    padding tar writers add up to the 10240-byte record (docs/protocol.md, "Bundles")."""
    end = tar.offset  # where the block that ended the member list starts
    record = tarfile.RECORDSIZE
    allowed = -(-(end + 2 * tarfile.BLOCKSIZE) // record) * record - end
    assert tar.fileobj is not None
    tar.fileobj.seek(end)
    tail = tar.fileobj.read(allowed + 1)
    if len(tail) < 2 * tarfile.BLOCKSIZE:
        raise BundleError(f"{path}: truncated: the archive stops {len(tail)} bytes after its last "
                          "member, before the two zero blocks that end a tar; copy it again or "
                          "rebuild it (fleetlite release build)")
    if len(tail) > allowed or tail.count(0) != len(tail):
        raise BundleError(f"{path}: unexpected bytes after the end of the archive (offset {end}):"
                          f" a damaged member header or appended data; only zero padding up to "
                          f"the {record}-byte tar record may follow. Copy it again or rebuild it")


def _check_member(path: Path, member: tarfile.TarInfo, listed: Mapping[str, FileEntry],
                  seen: Mapping[str, bytes]) -> None:
    name = member.name
    try:
        check_file_name(name)
    except UnsafeNameError as exc:
        raise BundleError(f"{path}: unsafe member name: {exc}") from None
    if not member.isreg():
        raise BundleError(f"{path}: member {name!r} is not a regular file (links, directories "
                          "and devices are refused)")
    if name not in listed:
        raise BundleError(f"{path}: member {name!r} is not listed in the manifest")
    if name in seen:
        raise BundleError(f"{path}: member {name!r} appears twice")


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, cap: int) -> bytes:
    handle = tar.extractfile(member)
    if handle is None:  # pragma: no cover - isreg() was checked
        raise BundleError(f"member {member.name!r} has no content")
    with handle:
        return handle.read(cap)


def sign_bundle(path: PathArg, key: SigningKey, *, limits: Limits = DEFAULT_LIMITS) -> Envelope:
    """Add ``key``'s signature to the bundle at ``path`` (directory or .flb), in place."""
    from fleetlite.sdk.atomic import write_atomic

    source = Path(path)
    bundle = load_bundle(source, limits=limits).sign(key)
    if source.is_dir():
        write_atomic(source / ENVELOPE_NAME, bundle.envelope_bytes())
    else:
        write_atomic(source, bundle.flb_bytes())
    return bundle.envelope
