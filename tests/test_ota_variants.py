"""Variants on the device: a probe smoke-tests every variant of a release and reports their
figures without installing anything; an install of a named variant fetches and installs that
variant alone (real OtaManager, real files, the real smoke-test subprocess and interpreter)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleetlite.agent.ota_state import OtaStateStore
from fleetlite.sdk.bundle import ReleaseBundle
from fleetlite.sdk.envelope import Envelope
from fleetlite.sdk.manifest import release_id
from fleetlite.sdk.messages import OtaStatus
from tests.ota_simulator import Served
from tests.test_lm_install import CHUNK, LM, LmDevice, lm_release

FIGURES = {"passed", "reason", "p95_ms", "peak_rss_mb", "load_ms", "fidelity", "ttft_ms",
           "decode_tok_s"}


@pytest.fixture
def device(tmp_path: Path) -> Iterator[LmDevice]:
    d = LmDevice(tmp_path)
    yield d
    d.ota.stop()


@pytest.fixture(scope="module")
def two_variants() -> ReleaseBundle:
    """The project's LM as float32 (default) and int8, whose smoke vectors hold the float's
    greedy tokens (the int8 one must agree on 80 % of them)."""
    return lm_release(1, extra_models=[LM / "home_lm_int8.tflite"], min_token_agreement=0.8)


def send(device: LmDevice, bundle: ReleaseBundle, **args: Any) -> OtaStatus:
    payload = Envelope.from_json(bundle.envelope.to_json(), max_bytes=2**30,
                                 max_payload_bytes=2**30).payload
    rid = release_id(payload)
    device.fleet.serve(rid, Served(bundle.envelope.to_json(),
                                   [bundle.files[f.name] for f in bundle.manifest.files], CHUNK))
    count = len(device.fleet.finals()) + 1
    assert device.ota.cmd_install({"release_id": rid, "chunk_size": CHUNK, **args})["accepted"]
    return device.fleet.wait_final(count, timeout=180)


def test_a_probe_measures_every_variant_and_installs_nothing(
        device: LmDevice, two_variants: ReleaseBundle) -> None:
    final = send(device, two_variants, probe=True)
    assert (final.outcome, final.reason) == ("probed", ""), final.message
    variants = final.progress["variants"]
    assert set(variants) == {"default", "home_lm_int8"}
    for name, figures in variants.items():
        assert set(figures) == FIGURES, (name, figures)
        assert figures["passed"] is True and figures["reason"] == ""
        assert figures["p95_ms"] > 0 and figures["peak_rss_mb"] > 0 and figures["ttft_ms"] > 0
        assert figures["decode_tok_s"] > 0
    # the float model reproduces its own greedy tokens; the int8 one agrees with them within
    # the release's threshold
    assert variants["default"]["fidelity"] == 1.0
    assert 0.8 <= variants["home_lm_int8"]["fidelity"] <= 1.0
    # nothing installed, nothing kept, nothing rejected
    assert device.installed_version() is None
    assert "home-lm" not in [lm.name for lm in device.lms]
    state = OtaStateStore(device.state_dir).load()
    assert state.job is None and "home-lm" not in state.models
    assert not any((device.state_dir / "ota" / "staging").iterdir())
    # the report travels as JSON as the fleet reads it
    assert OtaStatus.from_json(final.to_json()).progress == final.progress


def test_an_install_of_a_named_variant_fetches_and_serves_that_variant_alone(
        device: LmDevice, two_variants: ReleaseBundle) -> None:
    manifest = two_variants.manifest
    int8 = manifest.variant("home_lm_int8")
    final = send(device, two_variants, variant="home_lm_int8")
    assert (final.outcome, final.reason) == ("installed", ""), final.message
    state = OtaStateStore(device.state_dir).load().models["home-lm"]
    assert state.active is not None
    slot = state.slots[state.active]
    assert (slot.variant, slot.model_file) == ("home_lm_int8", int8.model.file)
    # the float model's bytes never travelled, and it is not in the slot
    default = manifest.default_variant
    fetched = sum(f.length for f in manifest.files
                  if f.name not in (default.model.file, default.smoke.file))
    assert device.fleet.bytes_sent == fetched
    slot_dir = device.state_dir / "models" / "home-lm" / state.active
    assert (slot_dir / int8.model.file).is_file()
    assert not (slot_dir / default.model.file).exists()
    assert device.answer("turn off the kitchen lights")


def test_an_unknown_variant_is_refused_with_the_names_there_are(
        device: LmDevice, two_variants: ReleaseBundle) -> None:
    final = send(device, two_variants, variant="fp16")
    assert (final.outcome, final.reason) == ("rejected", "unknown_variant")
    assert "default, home_lm_int8" in final.message
    assert device.installed_version() is None
    # a bad name is refused as a bad argument before anything starts
    with pytest.raises(Exception, match="variant must be"):
        device.ota.cmd_install({"release_id": two_variants.release_id, "variant": "Fp/16"})
    assert json.loads(final.to_json())["final"] is True
