"""The MQTT topic layout: the one place topic strings are built and parsed.

Every device topic has the device id as its own level, so a broker ACL can confine a device to
its subtree with ``pattern`` lines (``%c``/``%u`` must fill a whole level). With
{prefix} = ``fleetlite/v1/dev/{device_id}``::

    {prefix}/status       retained online/offline (+ Last Will)     device -> fleet
    {prefix}/birth        retained device facts and active models  device -> fleet
    {prefix}/telemetry    periodic system and model statistics     device -> fleet
    {prefix}/profile      on-device performance profile records    device -> fleet
    {prefix}/ota/status   OTA progress and outcomes                device -> fleet
    {prefix}/ota/request  chunks missing from a download           device -> fleet
    {prefix}/events       notable events (errors, rejected input)  device -> fleet
    {prefix}/shadow       shadow evaluation statistics (no data)   device -> fleet
    {prefix}/cmd          commands to the device                   fleet -> device
    {prefix}/cmd/resp     command responses (correlation id)       device -> fleet

Release topics are per release, not per device, so the broker fans a release out to every device
downloading it. With {rel} = ``fleetlite/v1/rel/{release_id}`` (64 lowercase hex digits)::

    {rel}/manifest                                  retained signed envelope   fleet -> devices
    {rel}/chunks/{size}/{block}/{file_index}/{index} retained chunk frame      fleet -> devices

Every chunk has its own retained topic, so the broker holds the release: a device that
subscribes to ``{rel}/chunks/{size}/{block}/+/+`` gets that block of every file at once,
however late it comes, and the fleet publishes each chunk once per release, not once per device
or wave. The chunk size is a level of its own, so a release served with two chunk sizes (or
again with another) never hands a device frames of the wrong size. The block level
(``index // chunks_per_block(size)``, blocks of BLOCK_BYTES) lets a device hold a bounded part
of a large release at the broker at a time: it subscribes to the first block it still misses
and the next, never to the whole release, so the broker queues at most two blocks for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from fleetlite.sdk.errors import FleetLiteError

ROOT = "fleetlite/v1"
DEVICE_PREFIX = f"{ROOT}/dev"

STATUS = "status"
BIRTH = "birth"
TELEMETRY = "telemetry"
PROFILE = "profile"
OTA_STATUS = "ota/status"
OTA_REQUEST = "ota/request"
EVENTS = "events"
SHADOW = "shadow"
COMMAND = "cmd"
COMMAND_RESPONSE = "cmd/resp"

DEVICE_TO_FLEET = (STATUS, BIRTH, TELEMETRY, PROFILE, OTA_STATUS, OTA_REQUEST, EVENTS,
                   COMMAND_RESPONSE, SHADOW)
FLEET_TO_DEVICE = (COMMAND,)
ALL_KINDS = DEVICE_TO_FLEET + FLEET_TO_DEVICE

RELEASE_PREFIX = f"{ROOT}/rel"
RELEASE_MANIFEST = "manifest"
RELEASE_CHUNKS = "chunks"
RELEASE_KINDS = (RELEASE_MANIFEST, RELEASE_CHUNKS)

MAX_DEVICE_ID_LENGTH = 64
_ALLOWED_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class TopicError(FleetLiteError):
    """A device id or topic string does not fit the FleetLite topic layout."""


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` if it can be one topic level (and an MQTT client id); else raise."""
    if not device_id or len(device_id) > MAX_DEVICE_ID_LENGTH:
        raise TopicError(
            f"device id {device_id!r} must be 1-{MAX_DEVICE_ID_LENGTH} characters long"
        )
    bad = sorted(set(device_id) - _ALLOWED_ID_CHARS)
    if bad or device_id in (".", ".."):
        raise TopicError(
            f"device id {device_id!r} may only use letters, digits, '-', '_' and '.'; "
            f"found {''.join(bad)!r}"
        )
    return device_id


def device_topic(device_id: str, kind: str) -> str:
    """The topic of one message kind for one device, e.g. ``fleetlite/v1/dev/gw-1/status``."""
    if kind not in ALL_KINDS:
        raise TopicError(f"unknown topic kind {kind!r}; expected one of {', '.join(ALL_KINDS)}")
    return f"{DEVICE_PREFIX}/{validate_device_id(device_id)}/{kind}"


def fleet_subscription(kind: str, shared_group: str | None = None) -> str:
    """The wildcard the fleet side subscribes to for one kind, optionally as a shared group."""
    if kind not in ALL_KINDS:
        raise TopicError(f"unknown topic kind {kind!r}")
    topic = f"{DEVICE_PREFIX}/+/{kind}"
    return f"$share/{shared_group}/{topic}" if shared_group else topic


@dataclass(frozen=True)
class DeviceTopic:
    """A parsed device topic."""

    device_id: str
    kind: str


def parse_device_topic(topic: str) -> DeviceTopic:
    """Split ``fleetlite/v1/dev/{id}/{kind}`` into its parts; raise TopicError otherwise."""
    prefix = DEVICE_PREFIX + "/"
    if not topic.startswith(prefix):
        raise TopicError(f"{topic!r} is not a FleetLite device topic (expected {prefix}...)")
    device_id, sep, kind = topic[len(prefix) :].partition("/")
    if not sep or kind not in ALL_KINDS:
        raise TopicError(f"{topic!r} has no known message kind after the device id")
    return DeviceTopic(validate_device_id(device_id), kind)


def validate_release_id(release_id: str) -> str:
    """Return ``release_id`` if it is 64 lowercase hex digits (a manifest's sha256); else raise."""
    if (not isinstance(release_id, str) or len(release_id) != 64
            or release_id.strip("0123456789abcdef")):
        raise TopicError(f"release id {str(release_id)[:80]!r} must be 64 lowercase hex digits "
                         "(the sha256 of the manifest payload)")
    return release_id


def release_topic(release_id: str, kind: str) -> str:
    """A release topic, e.g. ``fleetlite/v1/rel/{release_id}/manifest``; for ``chunks``, the
    level under which each chunk has its topic (:func:`chunk_topic`)."""
    if kind not in RELEASE_KINDS:
        raise TopicError(f"unknown release topic kind {kind!r}; expected one of "
                         f"{', '.join(RELEASE_KINDS)}")
    return f"{RELEASE_PREFIX}/{validate_release_id(release_id)}/{kind}"


# The chunk size, a file index (at most 65535: a frame's 2-byte field) and a chunk index (it
# fits a frame's 8-byte offset) are written in decimal without leading zeros, so each chunk has
# exactly one topic.
MAX_CHUNK_LEVEL_DIGITS = 20


#: A release's chunks are grouped in blocks of this many bytes (at least one chunk): the block
#: is a topic level, so a device subscribes to a release one block (two, with the next) at a
#: time and the broker never queues a whole large release for one device.
BLOCK_BYTES = 512 * 1024


def chunks_per_block(chunk_size: int) -> int:
    """How many chunks of ``chunk_size`` bytes one block holds (32 of 16 KiB, 2 of 256 KiB)."""
    return max(1, BLOCK_BYTES // chunk_size)


def chunk_block(chunk_size: int, index: int) -> int:
    """The block of chunk ``index`` of any file: ``index // chunks_per_block(chunk_size)``."""
    return index // chunks_per_block(chunk_size)


def chunk_topic(release_id: str, chunk_size: int, file_index: int, index: int) -> str:
    """The retained topic of one chunk:
    ``fleetlite/v1/rel/{release_id}/chunks/{chunk_size}/{block}/{file_index}/{index}``."""
    if chunk_size < 1 or not 0 <= file_index <= 0xFFFF or index < 0:
        raise TopicError(f"no chunk topic for chunk size {chunk_size}, file {file_index}, "
                         f"chunk {index}")
    return (f"{release_topic(release_id, RELEASE_CHUNKS)}/{chunk_size}/"
            f"{chunk_block(chunk_size, index)}/{file_index}/{index}")


def block_filter(release_id: str, chunk_size: int, block: int,
                 file_index: Optional[int] = None) -> str:
    """The subscription that receives block ``block`` of every file of a release served with
    ``chunk_size`` (retained and re-published): ``.../chunks/{chunk_size}/{block}/+/+``; with
    ``file_index``, of that file only: ``.../{block}/{file_index}/+`` (a device that fetches
    some of the release's files)."""
    if chunk_size < 1 or block < 0 or (file_index is not None
                                       and not 0 <= file_index <= 0xFFFF):
        raise TopicError(f"no block filter for chunk size {chunk_size}, block {block}, "
                         f"file {file_index}")
    files = "+" if file_index is None else str(file_index)
    return f"{release_topic(release_id, RELEASE_CHUNKS)}/{chunk_size}/{block}/{files}/+"


def chunks_filter(release_id: str, chunk_size: int) -> str:
    """The subscription that receives every chunk of a release served with ``chunk_size``
    (an observer's; a device subscribes block by block, :func:`block_filter`)."""
    return f"{release_topic(release_id, RELEASE_CHUNKS)}/{chunk_size}/+/+/+"


@dataclass(frozen=True)
class ReleaseTopic:
    """A parsed release topic; a chunk topic also gives its chunk size, file and index."""

    release_id: str
    kind: str
    chunk_size: int | None = None
    file_index: int | None = None
    index: int | None = None


def _chunk_level(text: str) -> int | None:
    if (not text or len(text) > MAX_CHUNK_LEVEL_DIGITS or not text.isascii()
            or not text.isdigit() or (text != "0" and text.startswith("0"))):
        return None
    return int(text)


def parse_release_topic(topic: str) -> ReleaseTopic:
    """Split ``fleetlite/v1/rel/{release_id}/manifest`` or
    ``.../chunks/{size}/{block}/{file}/{index}`` into its parts; raise TopicError otherwise
    (also for a block level that is not the chunk's block: each chunk has one topic)."""
    prefix = RELEASE_PREFIX + "/"
    if not topic.startswith(prefix):
        raise TopicError(f"{topic[:120]!r} is not a FleetLite release topic "
                         f"(expected {prefix}...)")
    release_id, sep, rest = topic[len(prefix):].partition("/")
    if not sep:
        raise TopicError(f"{topic[:120]!r} has no known release topic kind after the release id")
    if rest == RELEASE_MANIFEST:
        return ReleaseTopic(validate_release_id(release_id), RELEASE_MANIFEST)
    levels = rest.split("/")
    if len(levels) == 5 and levels[0] == RELEASE_CHUNKS:
        size, block, file_index, index = (_chunk_level(level) for level in levels[1:])
        if (size is not None and size >= 1 and block is not None and file_index is not None
                and index is not None and file_index <= 0xFFFF
                and block == chunk_block(size, index)):
            return ReleaseTopic(validate_release_id(release_id), RELEASE_CHUNKS, size,
                                file_index, index)
    raise TopicError(f"{topic[:120]!r} has no known release topic kind after the release id "
                     "(manifest, or chunks/{chunk_size}/{block}/{file_index}/{index} with "
                     "block = index // chunks per block)")
