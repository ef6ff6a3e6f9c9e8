"""The MQTT topic layout: the one place topic strings are built and parsed.

Every device topic has the device id as its own level, so a broker ACL can confine a device to
its subtree with ``pattern`` lines (``%c``/``%u`` must fill a whole level). With
{prefix} = ``fleetlite/v1/dev/{device_id}``::

    {prefix}/status       retained online/offline (+ Last Will)     device -> fleet
    {prefix}/birth        retained device facts and active models  device -> fleet
    {prefix}/telemetry    periodic system and model statistics     device -> fleet
    {prefix}/profile      on-device performance profile records    device -> fleet
    {prefix}/ota/status   OTA progress and outcomes                device -> fleet
    {prefix}/events       notable events (errors, rejected input)  device -> fleet
    {prefix}/cmd          commands to the device                   fleet -> device
    {prefix}/cmd/resp     command responses (correlation id)       device -> fleet
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetlite.sdk.errors import FleetLiteError

ROOT = "fleetlite/v1"
DEVICE_PREFIX = f"{ROOT}/dev"

STATUS = "status"
BIRTH = "birth"
TELEMETRY = "telemetry"
PROFILE = "profile"
OTA_STATUS = "ota/status"
EVENTS = "events"
COMMAND = "cmd"
COMMAND_RESPONSE = "cmd/resp"

DEVICE_TO_FLEET = (STATUS, BIRTH, TELEMETRY, PROFILE, OTA_STATUS, EVENTS, COMMAND_RESPONSE)
FLEET_TO_DEVICE = (COMMAND,)
ALL_KINDS = DEVICE_TO_FLEET + FLEET_TO_DEVICE

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
