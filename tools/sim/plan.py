"""The fleet plan: which simulated device has which class, fate and timing. Pure and seeded.

Every process of a ``--processes N`` run computes the same plan from the same settings and
takes its own slice, so a device's class, whether its installs fail, and its churn schedule do
not depend on how the fleet was split. Exactly ``round(fail_rate * devices)`` devices fail their
installs and ``round(reject_rate * devices)`` reject them, chosen by a seeded shuffle, so a test
can count them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from fleetlite.tools.sim.config import SimConfig, class_counts, device_name

#: what an install of a device ends with (its "fate")
INSTALL = "installed"
FAIL = "failed"
REJECT = "rejected"


@dataclass(frozen=True)
class DevicePlan:
    """One simulated device: its id and class, how its installs end, and its timing seeds."""

    index: int
    device_id: str
    device_class: str
    fate: str
    #: seconds after start before the first connect (``start_offline`` devices: an offline period)
    start_delay_s: float
    #: seed of the device's own random stream (jitter, churn times, profile noise)
    seed: int


def plan_fleet(config: SimConfig) -> list[DevicePlan]:
    """The whole fleet's plan, in device order."""
    rng = random.Random(f"fleetlite-sim:{config.seed}")
    classes: list[str] = []
    for name, count in class_counts(config.classes, config.devices):
        classes += [name] * count
    rng.shuffle(classes)  # classes interleave over the ids, as a real fleet's do
    order = list(range(config.devices))
    rng.shuffle(order)
    failing = round(config.fail_rate * config.devices)
    rejecting = round(config.reject_rate * config.devices)
    fates = [INSTALL] * config.devices
    for position, index in enumerate(order):
        if position < failing:
            fates[index] = FAIL
        elif position < failing + rejecting:
            fates[index] = REJECT
    offline = set(rng.sample(range(config.devices), round(config.start_offline * config.devices)))
    spread = config.devices / config.connect_rate
    plans = []
    for index in range(config.devices):
        delay = index / config.connect_rate if spread > 0 else 0.0
        if index in offline:
            delay += config.offline_s * rng.uniform(0.5, 1.5)
        plans.append(DevicePlan(index, device_name(config.prefix, index), classes[index],
                                fates[index], delay, rng.getrandbits(64)))
    return plans


def slice_of(plans: list[DevicePlan], part: int, parts: int) -> list[DevicePlan]:
    """Process ``part`` of ``parts``' devices: every ``parts``-th device from ``part`` on, so
    each process gets the same mix and the same connect pace."""
    return plans[part::parts]
