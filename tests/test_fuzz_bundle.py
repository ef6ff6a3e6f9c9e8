"""Fuzzing of ``.flb`` single-file bundles (:func:`fleetlite.sdk.bundle.load_bundle`), seeded
with a real release built and signed as the OTA tests build theirs: truncations at every kind of
boundary, bit flips, bytes after the archive, and hand-made tars with hostile members (types,
names, sizes, pax headers, order). Every file is loaded or refused with :class:`BundleError`.

What a reader accepts after the last member is fixed by docs/protocol.md ("Bundles"): the two
zero blocks that end a tar, then zero padding up to the 10240-byte tar record, nothing else.
"""

from __future__ import annotations

import functools
import io
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetlite.fleet.release_builder import build_release
from fleetlite.sdk.bundle import ENVELOPE_NAME, ReleaseBundle, load_bundle
from fleetlite.sdk.errors import BundleError
from fleetlite.sdk.keys import SigningKey
from tests.conftest import MODELS
from tests.fuzz_settings import HOSTILE_TEXT, corrupted, fuzz, parse_or_refuse

RELEASE_KEY = SigningKey.from_seed(b"\x22" * 32)  # the release key of tests/test_ota_install.py
ISSUED = 1_764_201_600
BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE


# Strategies are built from these cached values, not from pytest fixtures: a fixture's value
# fed into a strategy makes hypothesis report a flaky strategy while it shrinks a failure.
@functools.cache
def seed_release() -> ReleaseBundle:
    return build_release([MODELS / "intent_classifier.tflite"], name="intent", version=2,
                         device_classes=["raspberry-pi-4"], issued=ISSUED, keys=[RELEASE_KEY],
                         vocab=MODELS / "intent_classifier.vocab.json", smoke_cases=1)


@pytest.fixture(scope="module")
def release() -> ReleaseBundle:
    return seed_release()


@pytest.fixture(scope="module")
def flb() -> bytes:
    return seed_release().flb_bytes()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-bundle")


def members_end(data: bytes) -> int:
    """Where the last member's data (padded to a block) ends: the end-of-archive starts here."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        last = tar.getmembers()[-1]
    return last.offset_data + -(-last.size // BLOCK) * BLOCK


def header_offsets(data: bytes) -> list[int]:
    """Where each member's header starts, and where the end-of-archive starts."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return [member.offset for member in tar.getmembers()] + [members_end(data)]


def load(data: bytes, directory: Path) -> ReleaseBundle | None:
    path = directory / "release.flb"
    path.write_bytes(data)
    return parse_or_refuse(lambda: load_bundle(path), BundleError)


def _same_release(bundle: ReleaseBundle, release: ReleaseBundle) -> None:
    assert bundle.release_id == release.release_id
    assert dict(bundle.files) == dict(release.files)


def test_the_release_loads_and_its_archive_ends_where_tar_writers_end_it(
        flb: bytes, release: ReleaseBundle, workdir: Path) -> None:
    bundle = load(flb, workdir)
    assert bundle is not None
    _same_release(bundle, release)
    end = members_end(flb)
    assert flb[end:] == bytes(len(flb) - end) and len(flb) % RECORD == 0


# --- truncation and trailing bytes -----------------------------------------------------------


def cut_points(data: bytes) -> Iterator[int]:
    """Every block boundary, every member's header and data edges, and the bytes around them."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        edges = {0, len(data)}
        for member in tar.getmembers():
            edges |= {member.offset, member.offset_data, member.offset_data + member.size}
    edges |= set(range(0, len(data), BLOCK))
    for edge in sorted(edges):
        yield from (p for p in (edge - 1, edge, edge + 1) if 0 <= p < len(data))


def test_every_truncation_is_refused_until_the_end_of_archive_is_whole(
        flb: bytes, release: ReleaseBundle, workdir: Path) -> None:
    complete = members_end(flb) + 2 * BLOCK
    failures = []
    for cut in cut_points(flb):
        try:
            bundle = load(flb[:cut], workdir)
            if cut < complete:
                assert bundle is None, "accepted"
            else:
                assert bundle is not None, "refused"
                _same_release(bundle, release)
        except AssertionError as exc:
            failures.append(f"cut at {cut}: {exc}")
    assert not failures, "\n".join(failures[:20])


def test_a_truncated_flb_says_so(flb: bytes, workdir: Path) -> None:
    path = workdir / "cut.flb"
    path.write_bytes(flb[:len(flb) // 2])
    with pytest.raises(BundleError, match="truncated"):
        load_bundle(path)


@pytest.mark.parametrize("tail", [b"x", b"\x00" * 511 + b"\x01", b"\x00" * RECORD, b"PK\x03\x04"])
def test_bytes_after_the_archive_are_refused(flb: bytes, tail: bytes, workdir: Path) -> None:
    path = workdir / "tail.flb"
    path.write_bytes(flb + tail)
    with pytest.raises(BundleError, match="after the end of the archive"):
        load_bundle(path)


def test_a_second_archive_appended_is_refused(flb: bytes, workdir: Path) -> None:
    path = workdir / "two.flb"
    path.write_bytes(flb + flb)
    with pytest.raises(BundleError, match="after the end of the archive"):
        load_bundle(path)


def test_end_of_archive_without_record_padding_is_accepted(flb: bytes, release: ReleaseBundle,
                                                           workdir: Path) -> None:
    # what writers with a one-block record (Go's archive/tar) produce
    bundle = load(flb[:members_end(flb) + 2 * BLOCK], workdir)
    assert bundle is not None
    _same_release(bundle, release)


@fuzz(300)
@given(data=st.data())
def test_damaged_bundles_load_or_refuse(workdir: Path, data: st.DataObject) -> None:
    release = seed_release()
    flb = release.flb_bytes()
    damaged = data.draw(corrupted(flb, max_insert=2 * BLOCK, landmarks=header_offsets(flb)),
                        label="damaged")
    bundle = load(damaged, workdir)
    if bundle is not None:  # e.g. a flip in a member's content or mtime: structure intact
        assert set(bundle.files) == set(release.files)
        assert len(damaged) <= len(flb)


# --- hand-made archives -----------------------------------------------------------------------

TYPES = [tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE,
         tarfile.BLKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE,
         tarfile.GNUTYPE_SPARSE, b"Z"]
NAMES = [name for name in [*HOSTILE_TEXT, "/etc/passwd", "./manifest.json", "a/../b", "x" * 300,
                           "dir/", "\\evil", "manifest.json\x00.txt"]
         if "\ud800" not in name]  # tarfile cannot write a lone surrogate
PAX_KEYS = ["path", "linkpath", "size", "mtime", "uid", "uname", "hdrcharset", "comment",
            "GNU.sparse.map", "GNU.sparse.size", "GNU.sparse.major", "GNU.sparse.minor",
            "GNU.sparse.name", "GNU.sparse.realsize", "GNU.sparse.offset", "SCHILY.xattr.x"]


@st.composite
def hostile_archives(draw: st.DrawFn, release: ReleaseBundle) -> bytes:
    """A tar made member by member from the release's, each possibly renamed, retyped,
    resized, given hostile pax headers, dropped, duplicated or reordered."""
    members = [(ENVELOPE_NAME, release.envelope_bytes())]
    members += [(name, content) for name, content in release.files.items()]
    order = draw(st.sampled_from(["as is", "as is", "as is", "drop", "again", "shuffle",
                                  "any"]))
    if order == "drop":
        del members[draw(st.integers(1, len(members) - 1))]
    elif order == "again":
        members.insert(draw(st.integers(1, len(members))), draw(st.sampled_from(members)))
    elif order == "shuffle":
        members = draw(st.permutations(members))
    elif order == "any":
        members = draw(st.lists(st.sampled_from(members), max_size=6))
    out = io.BytesIO()
    fmt = draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]))
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            change = draw(st.sampled_from(["none", "none", "name", "type", "size", "pax"]))
            if change == "name":
                info.name = draw(st.sampled_from(NAMES))
            elif change == "type":
                info.type = draw(st.sampled_from(TYPES))
                info.linkname = draw(st.sampled_from(["", "/etc/passwd", "../x", ENVELOPE_NAME]))
            elif change == "pax":
                info.pax_headers = {draw(st.sampled_from(PAX_KEYS)):
                                    draw(st.sampled_from(["-1", "1,2,x", "9" * 30, "nan", "",
                                                          "../../x", "0", "1e9", "\x00"]))}
            info.size = len(content)
            info.mode = 0o644
            info.mtime = ISSUED
            body = content
            if change == "size":
                info.size = draw(st.sampled_from([0, 1, len(content) + 1, 2**33, 8**11 - 1]))
                body = content[:info.size]
            try:
                tar.addfile(info, io.BytesIO(body + bytes(max(0, info.size - len(body))))
                            if info.size < 2**20 else None)
            except (ValueError, tarfile.TarError, OverflowError, UnicodeError):
                continue  # this writer cannot express it: skip the member
    return out.getvalue()


@fuzz(300)
@given(data=st.data())
def test_hostile_archives_load_or_refuse(workdir: Path, data: st.DataObject) -> None:
    release = seed_release()
    archive = data.draw(hostile_archives(release), label="archive")
    bundle = load(archive, workdir)
    if bundle is not None:
        assert set(bundle.files) == set(release.files)
        for name, content in bundle.files.items():
            assert len(content) <= bundle.manifest.file(name).length + 1


def test_a_pax_header_tarfile_cannot_read_is_a_bundle_error(release: ReleaseBundle,
                                                              workdir: Path) -> None:
    info = tarfile.TarInfo(ENVELOPE_NAME)
    envelope = release.envelope_bytes()
    info.size = len(envelope)
    info.pax_headers = {"size": "nan"}  # Python 3.11's tarfile raises ValueError on it
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(envelope))
    path = workdir / "pax.flb"
    path.write_bytes(out.getvalue())
    with pytest.raises(BundleError):
        load_bundle(path)


def _first_members_only(data: bytes, keep: int) -> bytes:
    """The archive with only its first ``keep`` members and a proper end."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as source, \
            tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member in source.getmembers()[:keep]:
            tar.addfile(member, source.extractfile(member))
    return out.getvalue()


def test_a_missing_member_is_named(flb: bytes, workdir: Path) -> None:
    path = workdir / "short.flb"
    path.write_bytes(_first_members_only(flb, 2))
    with pytest.raises(BundleError, match="missing"):
        load_bundle(path)


def test_structure_errors_still_win_over_the_end_check(flb: bytes, workdir: Path) -> None:
    extra: Any = tarfile.TarInfo("evil.sh")
    extra.size = 2
    out = io.BytesIO(flb[:members_end(flb)])
    out.seek(0, io.SEEK_END)
    out.write(extra.tobuf(tarfile.PAX_FORMAT) + b"hi" + bytes(BLOCK - 2) + bytes(2 * BLOCK))
    path = workdir / "extra.flb"
    path.write_bytes(out.getvalue())
    with pytest.raises(BundleError, match="not listed in the manifest"):
        load_bundle(path)
