"""A seeded, synthetic home-automation dialogue corpus for FleetLite's tiny generative LMs.

Each dialogue is a user command (with paraphrases) and the one short confirmation a gateway
assistant answers, e.g. "turn off the kitchen lights" -> "ok, the kitchen lights are off.".
tools/train_lm.py trains the tokenizer and the models of tests/fixtures/lm/ on it; the model sees
``PROMPT_TEMPLATE.format(prompt=command)`` after a begin-of-sequence token, and learns to answer
with the reply followed by an end-of-sequence token. Pure Python, stdlib only.
"""

from __future__ import annotations

import random
from typing import Callable

# The markers are SentencePiece user-defined symbols, so each is always one piece.
USER_MARKER = "<user>"
BOT_MARKER = "<bot>"
PROMPT_TEMPLATE = USER_MARKER + " {prompt} " + BOT_MARKER

ROOMS = (
    "kitchen", "living room", "bedroom", "bathroom", "office", "hallway", "garage",
    "dining room", "basement", "nursery", "guest room", "laundry room", "attic", "porch",
)
SWITCHED = ("lights", "fan", "heater", "speaker", "tv", "lamp")
DOORS = ("front door", "back door", "garage door", "side door", "patio door")
PERCENTS = tuple(range(5, 101, 5))
DEGREES = tuple(range(15, 31))

Dialogue = tuple[str, str]
Maker = Callable[[random.Random], Dialogue]


def _plural(device: str) -> bool:
    return device.endswith("s")


def _switch(rng: random.Random) -> Dialogue:
    room, device, state = rng.choice(ROOMS), rng.choice(SWITCHED), rng.choice(("on", "off"))
    command = rng.choice((
        f"turn {state} the {room} {device}",
        f"switch {state} the {room} {device}",
        f"turn the {room} {device} {state}",
        f"please turn {state} the {room} {device}",
        f"can you turn {state} the {device} in the {room}",
        f"{room} {device} {state}",
        f"turn {state} the {device} in the {room} please",
    ))
    verb = "are" if _plural(device) else "is"
    return command, f"ok, the {room} {device} {verb} {state}."


def _dim(rng: random.Random) -> Dialogue:
    room, level = rng.choice(ROOMS), rng.choice(PERCENTS)
    command = rng.choice((
        f"dim the {room} lights to {level} percent",
        f"set the {room} lights to {level} percent",
        f"{room} lights to {level} percent",
        f"can you dim the lights in the {room} to {level} percent",
        f"please dim the {room} lights to {level} percent",
    ))
    return command, f"ok, the {room} lights are dimmed to {level} percent."


def _thermostat(rng: random.Random) -> Dialogue:
    degrees = rng.choice(DEGREES)
    if rng.random() < 0.4:
        command = rng.choice((
            f"set the thermostat to {degrees} degrees",
            f"make it {degrees} degrees",
            f"please set the thermostat to {degrees} degrees",
            f"thermostat to {degrees} degrees",
        ))
        return command, f"ok, the thermostat is set to {degrees} degrees."
    room = rng.choice(ROOMS)
    command = rng.choice((
        f"set the {room} thermostat to {degrees} degrees",
        f"make it {degrees} degrees in the {room}",
        f"set the thermostat in the {room} to {degrees} degrees",
        f"{room} thermostat to {degrees} degrees",
    ))
    return command, f"ok, the {room} thermostat is set to {degrees} degrees."


def _lock(rng: random.Random) -> Dialogue:
    door, action = rng.choice(DOORS), rng.choice(("lock", "unlock"))
    command = rng.choice((
        f"{action} the {door}",
        f"please {action} the {door}",
        f"can you {action} the {door}",
        f"{action} the {door} now",
    ))
    return command, f"ok, the {door} is {action}ed."


def _blinds(rng: random.Random) -> Dialogue:
    room, action = rng.choice(ROOMS), rng.choice(("open", "close"))
    command = rng.choice((
        f"{action} the {room} blinds",
        f"{action} the blinds in the {room}",
        f"please {action} the {room} blinds",
        f"can you {action} the blinds in the {room}",
    ))
    state = "open" if action == "open" else "closed"
    return command, f"ok, the {room} blinds are {state}."


def _temperature(rng: random.Random) -> Dialogue:
    room = rng.choice(ROOMS)
    command = rng.choice((
        f"what is the temperature in the {room}",
        f"how warm is the {room}",
        f"what's the temperature in the {room}",
        f"is it cold in the {room}",
    ))
    return command, f"checking the temperature in the {room} now."


# (maker, weight): dimming and thermostats carry a number to copy, so they get more examples.
MAKERS: tuple[tuple[Maker, int], ...] = (
    (_switch, 4), (_dim, 3), (_thermostat, 3), (_lock, 1), (_blinds, 2), (_temperature, 1),
)


def dialogues(seed: int, count: int) -> list[Dialogue]:
    """``count`` (command, reply) pairs drawn with ``random.Random(seed)``: same seed, same list."""
    rng = random.Random(seed)
    makers = [maker for maker, _ in MAKERS]
    weights = [weight for _, weight in MAKERS]
    return [rng.choices(makers, weights)[0](rng) for _ in range(count)]


def prompt_text(command: str) -> str:
    """The text the model is prompted with for one user command."""
    return PROMPT_TEMPLATE.format(prompt=command)
