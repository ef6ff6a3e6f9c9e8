"""Settings and strategies shared by the fuzzing suite (``tests/test_fuzz_*.py``).

Every fuzz test runs with a fixed seed (``derandomize``), no deadline and no example database, and
with the example count written in the test, so CI is reproducible and bounded.
``FLEETLITE_FUZZ_SCALE`` multiplies every count for a longer run (docs/security.md, "Fuzzing").
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any, Callable, Optional, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

SCALE = float(os.environ.get("FLEETLITE_FUZZ_SCALE", "1"))
#: the longest one example may take before it counts as a hang
HANG_SECONDS = 10.0

settings.register_profile(
    "fleetlite-fuzz",
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)

T = TypeVar("T")


def fuzz(examples: int) -> Callable[[T], T]:
    """``@settings`` of the fuzz profile with ``examples`` (times FLEETLITE_FUZZ_SCALE) examples."""
    count = max(1, round(examples * SCALE))
    return settings(settings.get_profile("fleetlite-fuzz"), max_examples=count)


class HangError(AssertionError):
    """One example ran longer than HANG_SECONDS: the parser does not bound its work."""


@contextmanager
def no_hang(seconds: float = HANG_SECONDS) -> Iterator[None]:
    """Fail the example (instead of hanging the suite) if the body runs longer than ``seconds``."""

    def expire(signum: int, frame: Optional[FrameType]) -> None:
        raise HangError(f"a parser ran longer than {seconds:g} s on one input")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def parse_or_refuse(parse: Callable[[], T],
                    errors: type[BaseException] | tuple[type[BaseException], ...],
                    check: Callable[[Any], None] | None = None) -> T | None:
    """``parse()``'s result, or None when it raised one of ``errors`` (then ``check(exc)``).

    Any other exception propagates and fails the example: that is the crash being hunted.
    """
    with no_hang():
        try:
            return parse()
        except errors as exc:
            assert str(exc), f"{type(exc).__name__} without a message"
            if check is not None:
                check(exc)
            return None


# --- hostile values -----------------------------------------------------------------------------

HOSTILE_NUMBERS: list[Any] = [
    0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, 10**400,
    1e308, 5e-324, -0.0, 0.5, float("inf"), float("-inf"), float("nan"), True, False,
]
#: number literals that only exist as JSON text (a float overflowing to infinity, and friends)
NUMBER_LITERALS = ["1e400", "-1E+999", "1.0e-400", "-0", "123456789012345678901234567890.5"]
HOSTILE_TEXT: list[Any] = [
    "", " ", "\x00", "a" * 65, "a" * 3000, "../../etc/passwd", "/abs/path", "..", ".hidden",
    "é", "\u202e", "\ud800", "💥", "manifest.json", "fleetlite/v1/dev/+/#", "%s%n", "null",
]


def scalars() -> st.SearchStrategy[Any]:
    return (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=16)
            | st.sampled_from(HOSTILE_NUMBERS) | st.sampled_from(HOSTILE_TEXT))


def json_values(max_leaves: int = 10) -> st.SearchStrategy[Any]:
    """Arbitrary JSON-like values, NaN and infinities and lone surrogates included."""
    return st.recursive(
        scalars(),
        lambda children: (st.lists(children, max_size=4)
                          | st.dictionaries(st.text(max_size=8), children, max_size=4)),
        max_leaves=max_leaves,
    )


class Pairs(list):  # type: ignore[type-arg]
    """A JSON object written with exactly these (key, value) pairs: keys may repeat."""


class Raw(str):
    """A JSON fragment written as is (e.g. nesting deeper than any parser recurses)."""


def dumps(value: Any) -> str:
    """JSON text of ``value``; writes NaN/Infinity, :class:`Pairs` and :class:`Raw` as given."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, Pairs):
        return "{" + ",".join(f"{json.dumps(str(k))}:{dumps(v)}" for k, v in value) + "}"
    if isinstance(value, dict):
        return dumps(Pairs(value.items()))
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    return json.dumps(value, allow_nan=True)


def encode(value: Any) -> bytes:
    return dumps(value).encode("utf-8")


def value_slots(doc: Any, depth: int = 0) -> Iterator[tuple[Any, Any]]:
    """(container, key) for every value inside ``doc`` (dict keys, list indices)."""
    if depth > 12 or isinstance(doc, Pairs):
        return
    items: Any = (doc.items() if isinstance(doc, dict)
                  else enumerate(doc) if isinstance(doc, list) else ())
    for key, value in list(items):
        yield doc, key
        yield from value_slots(value, depth + 1)


OPERATIONS = ("replace", "number", "number", "text", "retype", "delete", "add", "duplicate",
              "deep", "wrap")


def _retyped(value: Any) -> list[Any]:
    """The same value in other JSON types (the classic type confusion)."""
    out: list[Any] = [str(value)[:64], [value], {"value": value}, None]
    if isinstance(value, bool):
        out += [int(value), "true"]
    elif isinstance(value, int):
        out += [float(value) if abs(value) < 2**1000 else 1e308, -value, value + 2**63,
                value * 10**300, True]
    elif isinstance(value, float):
        out += [int(value) if math.isfinite(value) else 0, -value,
                float("nan"), float("inf")]
    elif isinstance(value, str):
        out += [value * 200, value.upper(), value + "\x00", value + "\ud800", len(value)]
    return out


@st.composite
def mutated(draw: st.DrawFn, doc: Any, *, deep: int = 5000, max_ops: int = 3) -> Any:
    """``doc`` (a JSON document) with one to ``max_ops`` structure-aware mutations: values
    replaced by hostile ones or other types, keys deleted, unknown or duplicate keys added,
    values wrapped, nesting deeper than parsers recurse."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, max_ops))):
        slots = list(value_slots(doc))
        if not slots:
            break
        container, key = draw(st.sampled_from(slots))
        operation = draw(st.sampled_from(OPERATIONS))
        value = container[key]
        if operation == "replace":
            container[key] = draw(json_values())
        elif operation == "number":
            container[key] = draw(st.sampled_from(HOSTILE_NUMBERS)
                                  | st.sampled_from(NUMBER_LITERALS).map(Raw))
        elif operation == "text":
            container[key] = draw(st.sampled_from(HOSTILE_TEXT))
        elif operation == "retype":
            container[key] = draw(st.sampled_from(_retyped(value)))
        elif operation == "delete" and isinstance(container, dict):
            del container[key]
        elif operation == "add" and isinstance(container, dict):
            name = draw(st.text(max_size=12) | st.sampled_from(["schema", "_type", "x", ""]))
            container[name] = draw(json_values())
        elif operation == "duplicate" and isinstance(container, dict):
            twin = draw(json_values())
            pairs = Pairs(container.items())
            pairs.insert(draw(st.integers(0, len(pairs))), (key, twin))
            _replace_container(doc, container, pairs)
            if container is doc:
                doc = pairs
        elif operation == "deep":
            depth = draw(st.integers(1, deep))
            container[key] = Raw("[" * depth + "]" * depth)
        elif operation == "wrap":
            container[key] = draw(st.sampled_from([[value], {"v": value}, [value, value]]))
    return doc


def single_mutations(doc: Any, *, deep: int = 5000) -> Iterator[tuple[str, Any]]:
    """Every single mutation of every value of ``doc``, exhaustively (no randomness): each
    hostile number, number literal and text, each other type, deletion and deep nesting.
    Yields (a label naming the path and the mutation, the mutated copy)."""
    replacements: list[Any] = [*HOSTILE_NUMBERS, *map(Raw, NUMBER_LITERALS), *HOSTILE_TEXT,
                               Raw("[" * 200 + "]" * 200), Raw("[" * deep + "]" * deep), [], {}]
    for index, (container, key) in enumerate(list(value_slots(doc))):
        value = container[key]
        options = [*replacements, *_retyped(value)]
        if isinstance(container, dict):
            options.append(_DELETE)
        for choice in options:
            copied = copy.deepcopy(doc)
            target, target_key = list(value_slots(copied))[index]
            if choice is _DELETE:
                del target[target_key]
            else:
                target[target_key] = copy.deepcopy(choice)
            yield f"{key!r}={dumps(choice)[:40] if choice is not _DELETE else '<deleted>'}", copied


_DELETE = object()


def sweep(doc: Any, check: Callable[[Any], None], *, deep: int = 5000) -> None:
    """Run ``check`` on every :func:`single_mutations` of ``doc``; fail listing every mutation
    whose check raised (an escaping exception or a failed assertion)."""
    failures = []
    for label, mutant in single_mutations(doc, deep=deep):
        try:
            check(mutant)
        except Exception as exc:
            failures.append(f"{label}: {type(exc).__name__}: {str(exc)[:160]}")
    assert not failures, f"{len(failures)} mutation(s) failed:\n" + "\n".join(failures[:40])


def _replace_container(doc: Any, old: Any, new: Any) -> None:
    for container, key in value_slots(doc):
        if container[key] is old:
            container[key] = new
            return


@st.composite
def corrupted(draw: st.DrawFn, data: bytes, *, max_insert: int = 64,
              landmarks: Sequence[int] = ()) -> bytes:
    """``data`` damaged at the byte level: truncated, bit-flipped, bytes replaced, inserted or
    appended, or a prefix of it followed by random bytes. ``landmarks`` are offsets worth
    damaging more often (e.g. where a tar member's header starts)."""
    operation = draw(st.sampled_from(["truncate", "flip", "overwrite", "insert", "append",
                                      "splice"]))
    buf = bytearray(data)
    anywhere = st.integers(0, max(0, len(buf) - 1))
    if landmarks:
        near = st.tuples(st.sampled_from(list(landmarks)), st.integers(-8, 600)).map(
            lambda spot: min(max(0, spot[0] + spot[1]), max(0, len(buf) - 1)))
        anywhere = anywhere | near
    if operation == "truncate":
        return bytes(buf[:draw(anywhere)])
    if operation == "flip":
        for _ in range(draw(st.integers(1, 8))):
            position = draw(anywhere)
            if buf:
                buf[position] ^= 1 << draw(st.integers(0, 7))
        return bytes(buf)
    if operation == "overwrite":
        position = draw(anywhere)
        patch = draw(st.binary(min_size=1, max_size=16))
        buf[position:position + len(patch)] = patch
        return bytes(buf)
    if operation == "insert":
        position = draw(anywhere)
        buf[position:position] = draw(st.binary(min_size=1, max_size=max_insert))
        return bytes(buf)
    if operation == "append":
        return bytes(buf) + draw(st.binary(min_size=1, max_size=max_insert))
    cut = draw(anywhere)
    return bytes(buf[:cut]) + draw(st.binary(max_size=max_insert))


def hostile_bytes(valid: bytes, doc: Any = None, *, deep: int = 5000) -> st.SearchStrategy[bytes]:
    """Bytes for a parser: random, corrupted ``valid`` bytes, or (given the decoded ``doc``)
    structure-aware mutations of it."""
    options = [st.binary(max_size=256), corrupted(valid)]
    if doc is not None:
        options.append(mutated(doc, deep=deep).map(encode))
    return st.one_of(*options)
