"""One simulated install: the device side of OTA delivery as a sans-I/O state machine.

Fed the bytes the broker delivers (the retained manifest envelope, chunk frames) and the clock,
it returns the messages to publish (``fleetlite.ota_status/1``, ``fleetlite.chunk_request/1``).
Everything a real device checks is checked with the ``sdk/`` code: the manifest hashes to the
release id, :func:`~fleetlite.sdk.verify.verify_release` against the device's pinned root,
version and class, every frame against the signed lengths
(:func:`~fleetlite.sdk.chunks.decode_frame`), every file's length and sha256
(:class:`~fleetlite.sdk.verify.FileVerifier`). Files are hashed in order as chunks arrive and
only out-of-order chunks are held, so a device holds little more than a chunk or two in memory.

Not simulated: the smoke test, the A/B switch and the health window run no model; they are
phases with a delay (the adapter's), and a device planned to fail or reject ends there with the
planned reason. Request timing follows docs/protocol.md ("OTA delivery") and the agent's
``DownloadTracker``: the device subscribes to the first chunk block it misses and the next
(:meth:`Install.wanted_blocks`), the broker delivers their retained chunks on subscription, and
every ask names only chunks of those blocks; after ``idle_s``
without a new chunk (counted from the subscription) the device first subscribes to the exact
topics of the next missing chunks (a :class:`Resubscribe` round: the broker re-sends their
retained copies to this device alone), the next round at once when a round's chunks all came;
a request goes out only when a round brought nothing within ``idle_s`` (backing off up to 6x),
at once when a request's chunks all came, and ``download_stalled`` after ``max_unanswered``
requests in a row without a new chunk.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Union

from fleetlite.sdk.chunks import (
    ChunkBitmap,
    ChunkError,
    ChunkLayout,
    decode_frame,
    expand_ranges,
)
from fleetlite.sdk.envelope import Envelope
from fleetlite.sdk.errors import EqualVersion, FileMismatchError, UpdateRejected
from fleetlite.sdk.manifest import Manifest, release_id
from fleetlite.sdk.messages import OtaStatus
from fleetlite.sdk.ota_messages import ChunkRequest
from fleetlite.sdk.ota_progress import ProgressPacer
from fleetlite.sdk.topics import chunks_per_block
from fleetlite.sdk.trust import Root
from fleetlite.sdk.verify import FileVerifier, verify_release

__all__ = ["RESUBSCRIBE_CHUNKS", "Install", "Outcome", "Resubscribe", "fail_phase"]

#: the phase a planned failure ends in, by reason (others: ``switching``)
_PHASE_OF_REASON = {
    "download_stalled": "downloading", "download_timeout": "downloading",
    "disk_full": "downloading", "staging_io_error": "downloading",
    "hash_mismatch": "verifying", "length_mismatch": "verifying",
    "smoke_crashed": "smoke_testing", "smoke_timeout": "smoke_testing",
    "invalid_model": "smoke_testing", "smoke_vectors_mismatch": "smoke_testing",
    "smoke_output_mismatch": "smoke_testing", "over_latency_budget": "smoke_testing",
    "over_memory_budget": "smoke_testing", "smoke_test_unavailable": "smoke_testing",
    "health_check_failed": "health_check", "crashed_during_health_window": "health_check",
}
_AFTER_DOWNLOAD = ("verifying", "smoke_testing", "switching", "health_check")
_BACKOFF_CAP = 6
#: a re-subscription round names at most this many chunks (the agent's RESUBSCRIBE_CHUNKS)
RESUBSCRIBE_CHUNKS = 64


def fail_phase(reason: str) -> str:
    """The install phase in which a planned failure with ``reason`` ends."""
    return _PHASE_OF_REASON.get(reason, "switching")


@dataclass(frozen=True)
class Outcome:
    """How an install ended: the final status's outcome, reason and message."""

    outcome: str
    reason: str
    message: str


@dataclass(frozen=True)
class Resubscribe:
    """Subscribe to the exact chunk topics of ``chunks`` (``(file_index, index)``) and drop the
    previous round's: the broker sends each newly subscribed topic's retained copy to this
    device alone."""

    chunks: tuple[tuple[int, int], ...]


Ask = Union[ChunkRequest, Resubscribe]


@dataclass
class Install:
    """The state of one install on one simulated device.

    ``planned``: the outcome the plan gives this device's installs (``installed``, ``failed``,
    ``rejected``) and ``planned_reason`` its reason; a real verification failure (a bad
    signature, a hash mismatch, the same version) wins over the plan.
    """

    device_id: str
    release_id: str
    chunk_size: int
    root: Root | None
    device_class: str
    model: str
    installed_version: int | None
    planned: str = "installed"
    planned_reason: str = ""
    rejected_versions: Collection[int] = ()
    idle_s: float = 5.0
    first_request_s: float | None = None  # None: idle_s
    max_unanswered: int = 10
    resubscribe_chunks: int = RESUBSCRIBE_CHUNKS
    pacer: ProgressPacer = field(default_factory=ProgressPacer)  # as the agent
    manifest: Manifest | None = None
    layout: ChunkLayout | None = None
    bitmap: ChunkBitmap | None = None
    ended: Outcome | None = None
    duplicates: int = 0
    refused: int = 0
    requests: int = 0
    resubscribes: int = 0
    _verifiers: list[FileVerifier] = field(default_factory=list)
    _next: list[int] = field(default_factory=list)  # per file: next chunk index to hash
    _held: dict[tuple[int, int], bytes] = field(default_factory=dict)
    _asked: set[tuple[int, int]] = field(default_factory=set)
    _last_request: float = 0.0
    _last_resubscribe: float | None = None
    _last_ask: str = ""  # "resubscribe" or "request": what the outstanding _asked belong to
    _last_progress: float = 0.0
    _unanswered: int = 0

    # -- messages ------------------------------------------------------------------------

    def status(self, phase: str, *, final: bool = False, progress: dict[str, Any] | None = None
               ) -> OtaStatus:
        """An OTA status of this install in ``phase`` (the final one when it has ended)."""
        name, version = ((self.manifest.name, self.manifest.version) if self.manifest
                         else ("", 0))
        ended = self.ended if final else None
        return OtaStatus(device_id=self.device_id, ts=time.time(), release_id=self.release_id,
                         model=name, version=version, phase=phase, final=final,
                         outcome=ended.outcome if ended else "",
                         reason=ended.reason if ended else "",
                         message=ended.message if ended else "", progress=progress or {})

    def final(self) -> OtaStatus:
        return self.status("done", final=True)

    def progress(self) -> dict[str, Any]:
        if self.layout is None or self.bitmap is None:
            return {}
        received = sum(self.layout.chunk_length(f, i) for f, i in self._have())
        return {"received_bytes": received, "total_bytes": self.layout.total_bytes,
                "received_chunks": self.bitmap.received, "total_chunks": self.bitmap.total,
                "duplicates": self.duplicates, "refused": self.refused}

    def _have(self) -> list[tuple[int, int]]:
        assert self.layout is not None and self.bitmap is not None
        return [(f, i) for f, count in enumerate(self.layout.counts) for i in range(count)
                if self.bitmap.have(f, i)]

    def _end(self, outcome: str, reason: str, message: str) -> None:
        if self.ended is None:
            self.ended = Outcome(outcome, reason, message)

    # -- manifest ------------------------------------------------------------------------

    def on_manifest(self, payload: bytes, now: float) -> list[ChunkRequest]:
        """Verify the retained envelope; start the download if it holds (the caller then
        subscribes to the chunks: the broker delivers them, so no request is due yet)."""
        if self.manifest is not None or self.ended is not None or not payload:
            return []
        try:
            envelope = Envelope.from_json(payload, max_bytes=512 * 1024,
                                          max_payload_bytes=256 * 1024)
        except UpdateRejected as exc:
            self._end("rejected", exc.reason, str(exc))
            return []
        if release_id(envelope.payload) != self.release_id:
            self._end("rejected", "release_id_mismatch", "the manifest on the release topic "
                      "does not hash to the requested release id")
            return []
        if self.root is None:
            self._end("rejected", "no_trusted_root", "no trusted root provisioned")
            return []
        try:
            manifest = verify_release(
                payload, root=self.root, installed_version=self.installed_version,
                device_class=self.device_class, time_floor=time.time(),
                rejected_versions=self.rejected_versions, model_name=self.model)
        except EqualVersion as exc:
            self._end("no_change", exc.reason, str(exc))
            return []
        except UpdateRejected as exc:
            self._end("rejected", exc.reason, str(exc))
            return []
        self.manifest = manifest
        self.layout = ChunkLayout.from_manifest(manifest, self.chunk_size)
        self.bitmap = ChunkBitmap(self.layout.counts)
        self._verifiers = [FileVerifier(entry) for entry in manifest.files]
        self._next = [0] * len(manifest.files)
        self._last_progress = now
        self.pacer.start(now, 0, self.bitmap.total)
        self._check_files()  # a release of empty files is complete at once
        return []

    # -- chunks --------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        return self.bitmap is not None and self.bitmap.complete()

    def on_chunk(self, frame: bytes, now: float) -> list[ChunkRequest]:
        """Take one frame; returns the requests it makes due (the next batch, or ``done``)."""
        if self.layout is None or self.bitmap is None or self.ended is not None:
            return []
        try:
            chunk = decode_frame(frame, self.layout)
        except ChunkError:
            self.refused += 1
            return []
        key = (chunk.file_index, chunk.index)
        if not self.bitmap.set(*key):
            self.duplicates += 1
            return []
        self._last_progress = now
        self._unanswered = 0
        self._asked.discard(key)
        self._held[key] = chunk.data
        self._hash_in_order(chunk.file_index)
        if self.planned == "failed" and fail_phase(self.planned_reason) == "downloading" \
                and self.bitmap.received * 2 >= self.bitmap.total:
            self._end("failed", self.planned_reason, f"simulated {self.planned_reason} half way "
                      "through the download")
            return []
        if self.bitmap.complete():
            self._check_files()
            return [self._done_request(now)] if self.ended is None else []
        if self._last_ask == "request" and not self._asked:
            return [self._request(now)]
        return []  # a round whose chunks all came: poll makes the next one

    def _hash_in_order(self, file_index: int) -> None:
        verifier = self._verifiers[file_index]
        while (file_index, self._next[file_index]) in self._held:
            data = self._held.pop((file_index, self._next[file_index]))
            try:
                verifier.update(data)
            except FileMismatchError as exc:
                self._end("failed", exc.reason, str(exc))
                return
            self._next[file_index] += 1

    def _check_files(self) -> None:
        if not self.complete:
            return
        for verifier in self._verifiers:
            try:
                verifier.finish()
            except FileMismatchError as exc:
                self._end("failed", exc.reason, str(exc))
                return

    # -- requests ------------------------------------------------------------------------

    def poll(self, now: float) -> list[Ask]:
        """The next round at once when the last round's chunks all came; after ``idle_s`` of
        silence (``first_request_s`` before any chunk) a :class:`Resubscribe` round if none
        was made since the last new chunk, else a request, or the end as
        ``download_stalled``."""
        if self.bitmap is None or self.ended is not None or self.complete:
            return []
        if self._last_ask == "resubscribe" and not self._asked and not self._unanswered:
            return [self._resubscribe(now)]
        quiet_since = self._quiet_since()
        idle = self._idle()
        if now - quiet_since < idle:
            return []
        if self._last_resubscribe is None or self._last_resubscribe < self._last_progress:
            return [self._resubscribe(now)]
        if self._unanswered >= self.max_unanswered:
            self._end("failed", "download_stalled", f"{self._unanswered} chunk requests in a "
                      "row got no new chunk")
            return []
        return [self._request(now)]

    def next_poll_in(self, now: float) -> float:
        if self._last_ask == "resubscribe" and not self._asked:
            return 0.0
        return max(0.05, self._quiet_since() + self._idle() - now)

    def _quiet_since(self) -> float:
        return max(self._last_request, self._last_progress, self._last_resubscribe or 0.0)

    def _idle(self) -> float:
        if not self._last_ask and self.bitmap is not None and not self.bitmap.received:
            # nothing retained came yet
            return self.idle_s if self.first_request_s is None else self.first_request_s
        return self.idle_s * min(1 << max(0, self._unanswered - 1), _BACKOFF_CAP)

    def progress_due(self, now: float) -> bool:
        """Whether a ``downloading`` progress status is due (:class:`ProgressPacer`, as the
        agent: every 10 s, or at each 10 % no closer than 2 s, while new chunks come)."""
        if self.bitmap is None:
            return False
        return self.pacer.due(now, self.bitmap.received, self.bitmap.total)

    def wanted_blocks(self) -> range:
        """The chunk blocks to be subscribed to now: the first one still missing a chunk and
        the next (docs/protocol.md, "Flow"); empty before the manifest and once complete."""
        if self.bitmap is None or self.ended is not None:
            return range(0)
        return self.bitmap.wanted_blocks(chunks_per_block(self.chunk_size))

    def _below(self) -> int:
        """Asks name only chunks of the subscribed blocks: their indexes are below this."""
        return self.wanted_blocks().stop * chunks_per_block(self.chunk_size)

    def _resubscribe(self, now: float) -> Resubscribe:
        assert self.bitmap is not None
        limit = self.resubscribe_chunks
        chunks = list(expand_ranges(self.bitmap.missing_ranges(limit, limit, self._below())))
        self._asked = set(chunks)
        self._last_resubscribe = now
        self._last_ask = "resubscribe"
        self.resubscribes += 1
        return Resubscribe(tuple(chunks))

    def _request(self, now: float) -> ChunkRequest:
        assert self.bitmap is not None
        ranges = self.bitmap.missing_ranges(below=self._below())
        self._asked = {(f, i) for f, first, end in ranges for i in range(first, end)}
        self._last_request = now
        self._last_ask = "request"
        self._unanswered += 1
        self.requests += 1
        return ChunkRequest(device_id=self.device_id, release_id=self.release_id,
                            chunk_size=self.chunk_size, ts=time.time(), missing=tuple(ranges))

    def _done_request(self, now: float) -> ChunkRequest:
        self._last_request = now
        self.requests += 1
        return ChunkRequest(device_id=self.device_id, release_id=self.release_id,
                            chunk_size=self.chunk_size, ts=time.time(), done=True)

    # -- after the download --------------------------------------------------------------

    def remaining_phases(self) -> list[str]:
        """The phases still to report after a complete, verified download. A planned failure or
        rejection ends the install in its phase (which is the last one listed)."""
        if self.ended is not None or not self.complete:
            return []
        if self.planned in ("failed", "rejected"):
            stop = fail_phase(self.planned_reason)
            if stop in _AFTER_DOWNLOAD:
                return list(_AFTER_DOWNLOAD[:_AFTER_DOWNLOAD.index(stop) + 1])
        return list(_AFTER_DOWNLOAD)

    def finish(self) -> Outcome:
        """End a complete download as planned; returns the outcome (also kept in ``ended``)."""
        if self.ended is None:
            if self.planned in ("failed", "rejected"):
                self._end(self.planned, self.planned_reason, f"simulated {self.planned_reason} "
                          f"in {fail_phase(self.planned_reason)}")
            else:
                assert self.manifest is not None
                self._end("installed", "", f"{self.manifest.name} v{self.manifest.version} "
                          "serving (simulated)")
        assert self.ended is not None
        return self.ended
