"""The variant choice per device class (fleet/variant_choice.py): pure, from probe figures,
budgets and pins."""

from __future__ import annotations

import pytest

from fleetlite.fleet.variant_choice import (
    VariantBudget,
    VariantChoice,
    VariantProbe,
    choose_variant,
    probes_from_progress,
)

BUDGET = VariantBudget(max_p95_latency_ms=100.0, max_peak_rss_mb=500.0)
VARIANTS = ("fp32", "int8")


def probe(device: str, variant: str, p95: float, rss: float, fidelity: float,
          passed: bool = True, reason: str = "") -> VariantProbe:
    return VariantProbe(device, variant, passed, reason, p95_ms=p95, peak_rss_mb=rss,
                        fidelity=fidelity)


def both(fp32: tuple[float, float, float], int8: tuple[float, float, float],
         devices: tuple[str, ...] = ("d1", "d2")) -> list[VariantProbe]:
    return [probe(d, "fp32", *fp32) for d in devices] + [probe(d, "int8", *int8)
                                                         for d in devices]


@pytest.mark.parametrize(("probes", "pin", "variant", "pinned", "words"), [
    # both fit: the better fidelity wins
    (both((50, 300, 1.0), (20, 100, 0.97)), None, "fp32", False, "best fidelity"),
    # fp32 too slow for the class: int8
    (both((150, 300, 1.0), (20, 100, 0.97)), None, "int8", False, "150.0 ms > budget 100 ms"),
    # fp32 too big
    (both((50, 800, 1.0), (20, 100, 0.97)), None, "int8", False, "800.0 MB > budget 500 MB"),
    # equal fidelity: the smaller p95
    (both((50, 300, 0.99), (20, 100, 0.99)), None, "int8", False, "best fidelity"),
    # nothing fits: excluded, naming the figures
    (both((150, 300, 1.0), (120, 100, 0.97)), None, None, False, "120.0 ms > budget 100 ms"),
    # a pin wins even when it does not fit, and says so
    (both((150, 300, 1.0), (20, 100, 0.97)), "fp32", "fp32", True, "would not have been"),
    # a pin the release does not have excludes the class
    (both((50, 300, 1.0), (20, 100, 0.97)), "fp16", None, True, "does not have"),
    # no results at all: excluded
    ([], None, None, False, "no device of it answered"),
    # a pin with no results still wins
    ([], "int8", "int8", True, "no probe results"),
])
def test_choice_table(probes: list[VariantProbe], pin: str | None, variant: str | None,
                      pinned: bool, words: str) -> None:
    choice = choose_variant("rpi", VARIANTS, probes, BUDGET, pin=pin)
    assert choice.variant == variant
    assert choice.pinned is pinned
    assert words in choice.reason
    assert VariantChoice.from_dict(choice.to_dict()) == choice


def test_a_variant_must_pass_on_every_probed_device() -> None:
    probes = [probe("d1", "fp32", 50, 300, 1.0), probe("d2", "fp32", 50, 300, 1.0,
                                                       passed=False, reason="smoke_crashed"),
              probe("d1", "int8", 20, 100, 0.9), probe("d2", "int8", 20, 100, 0.95)]
    choice = choose_variant("rpi", VARIANTS, probes, BUDGET)
    assert choice.variant == "int8"
    fp32 = choice.figures[0]
    assert (fp32.devices_probed, fp32.devices_passed, fp32.fits) == (2, 1, False)
    assert "d2: smoke_crashed" in fp32.why
    # a device that said nothing of a variant did not pass it either
    missing = [p for p in probes if not (p.device_id == "d2" and p.variant == "int8")]
    assert choose_variant("rpi", ("int8",), missing, BUDGET).variant is None


def test_figures_are_median_p95_max_rss_min_fidelity() -> None:
    probes = [probe("d1", "int8", 10, 100, 0.99), probe("d2", "int8", 30, 300, 0.95),
              probe("d3", "int8", 20, 200, 0.97)]
    figures = choose_variant("rpi", ("int8",), probes, BUDGET).figures[0]
    assert (figures.median_p95_ms, figures.max_peak_rss_mb, figures.min_fidelity) == (
        20.0, 300.0, 0.95)
    assert figures.devices_probed == 3


def test_unmeasured_figures_do_not_fit_a_budget_but_fit_none() -> None:
    probes = [VariantProbe("d1", "int8", True)]
    assert choose_variant("rpi", ("int8",), probes, BUDGET).variant is None
    assert choose_variant("rpi", ("int8",), probes, VariantBudget()).variant == "int8"


def test_probes_from_progress_reads_the_contract() -> None:
    progress = {"variants": {
        "int8": {"passed": True, "reason": "", "p95_ms": 12.5, "peak_rss_mb": 80,
                 "load_ms": 40.0, "fidelity": 0.98, "ttft_ms": 30.0, "decode_tok_s": 55.0},
        "fp32": {"passed": False, "reason": "smoke_timeout", "p95_ms": None,
                 "peak_rss_mb": None, "load_ms": None, "fidelity": None},
        "bad": "nonsense",
        "odd": {"passed": True, "p95_ms": float("nan"), "fidelity": 7},
    }}
    found = {p.variant: p for p in probes_from_progress("d1", progress)}
    assert found["int8"] == VariantProbe("d1", "int8", True, "", 12.5, 80.0, 40.0, 0.98, 30.0,
                                         55.0)
    assert not found["fp32"].passed and found["fp32"].reason == "smoke_timeout"
    assert not found["bad"].passed and found["bad"].reason == "malformed_probe"
    assert found["odd"].p95_ms is None and found["odd"].fidelity is None
    assert probes_from_progress("d1", {}) == []
