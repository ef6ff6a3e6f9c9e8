"""Variants per device class end to end: real agent processes of two device classes, a real
Mosquitto, a real controller and store. A release of the project's LM as float32 and int8 rolls
out with ``variants="auto"``: a probe wave measures both variants on each class's devices, each
class gets the variant its budgets call for (a class whose devices refuse the float model's size
gets int8; where both fit, the better fidelity, then the faster), an operator's pin wins, and
``rollout status -o json`` shows the figures behind each choice; every device ends serving its
class's variant."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fleetlite.agent.ota_state import OtaStateStore
from fleetlite.fleet import Fleet
from fleetlite.fleet.gates import GateSpec
from fleetlite.fleet.release_builder import build_release
from fleetlite.sdk.device_class import PROFILES_ENV, default_profiles_dir
from fleetlite.sdk.local_client import LocalClient
from tests.test_fleet_e2e import (  # noqa: F401 (site: the imported fixture)
    FAST,
    Site,
    site,
    wait_until,
)
from tests.test_generation import LM
from tests.test_ota_install import ISSUED, RELEASE_KEY

TINY = "tiny-gateway"  # a test class whose model-size budget (1 MB) the float LM (2.2 MB) breaks
DEVICES = {"gw-x86-1": FAST, "gw-x86-2": FAST, "gw-tiny-1": TINY, "gw-tiny-2": TINY}
PROMPT = "turn off the kitchen lights"


@pytest.fixture
def profiles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The stock device profiles plus the tiny class, for the agents and the fleet alike."""
    folder = tmp_path / "device_profiles"
    shutil.copytree(default_profiles_dir(), folder)
    text = (folder / "small-arm-gateway.yaml").read_text()
    text = text.replace("device_class: small-arm-gateway", f"device_class: {TINY}")
    text = text.replace("max_model_size_mb: 64", "max_model_size_mb: 1")
    assert f"device_class: {TINY}" in text and "max_model_size_mb: 1\n" in text
    (folder / f"{TINY}.yaml").write_text(text)
    monkeypatch.setenv(PROFILES_ENV, str(folder))
    return folder


def release() -> tuple[str, str, object]:
    bundle = build_release([LM / "home_lm.tflite", LM / "home_lm_int8.tflite"], name="home-lm",
                           version=1, device_classes=sorted(set(DEVICES.values())),
                           issued=ISSUED, keys=[RELEASE_KEY], tokenizer=LM / "home_lm.spm.model",
                           prompt_template="<user> {prompt} <bot>",
                           smoke_prompts=[PROMPT, "lock the front door"], smoke_tokens=12,
                           min_token_agreement=0.8)
    names = [v.name for v in bundle.manifest.all_variants()]
    assert names == ["default", "home_lm_int8"]
    return names[0], names[1], bundle


@pytest.mark.parametrize("pin", [False, True], ids=["budgets decide", "a pin wins"])
def test_each_class_ends_on_the_variant_its_budgets_call_for(
        site: Site, store_url: str, models_dir: Path, profiles: Path,  # noqa: F811
        capsys: pytest.CaptureFixture[str], pin: bool) -> None:
    site.start_agents(DEVICES, "intent", models_dir / "intent_classifier.tflite", socket=True,
                      threads=dict.fromkeys(set(DEVICES.values()), 1))
    site.start_controllers(store_url, 1)
    wait_until(lambda: {d.device_id for d in site.store.list_devices(online=True)}
               == set(DEVICES), 60, "every device online")
    fp32, int8, bundle = release()
    site.store.add_release(bundle.release_id, "home-lm", 1, bundle.envelope.to_json(),
                           dict(bundle.files), bundle.manifest.to_dict())
    pins = {FAST: fp32} if pin else {}
    with Fleet(store_url) as fleet:
        rollout = fleet.create_rollout(bundle.release_id, variants="auto", pins=pins,
                                       probe_devices_per_class=1, waves="1,100%",
                                       wave_timeout_s=180, chunk_size=65536,
                                       gates=GateSpec(max_p95_regression=None, min_profiles=0))
        wait_until(lambda: fleet.rollout(rollout.rollout_id).finished, 300,
                   "the rollout to finish")
        final = fleet.rollout(rollout.rollout_id)
        assert final.completed, final.reason
    # what the operator sees: the choice per class and the figures that decided it
    from fleetlite.fleet.cli import main

    assert main(["rollout", "status", rollout.rollout_id, "-o", "json", "--db", store_url]) == 0
    doc = json.loads(capsys.readouterr().out)
    fast = {f["variant"]: f for f in doc["variants"][FAST]["figures"]}
    assert fast[fp32]["fits"] and fast[fp32]["min_fidelity"] == 1.0
    assert fast[int8]["fits"]
    # both fit the fast class: the better fidelity wins, then the smaller p95 (measured here)
    by_rule = min((fp32, int8), key=lambda v: (-fast[v]["min_fidelity"],
                                               fast[v]["median_p95_ms"], v))
    want = {FAST: fp32 if pin else by_rule, TINY: int8}
    chosen = {c: (v["variant"], v["pinned"]) for c, v in doc["variants"].items()}
    assert chosen == {FAST: (want[FAST], pin), TINY: (int8, False)}, json.dumps(doc["variants"])
    tiny = {f["variant"]: f for f in doc["variants"][TINY]["figures"]}
    assert not tiny[fp32]["fits"] and tiny[fp32]["devices_passed"] == 0  # refused on size
    assert tiny[int8]["fits"] and tiny[int8]["median_p95_ms"] > 0
    assert 0.8 <= tiny[int8]["min_fidelity"] <= 1.0
    # every device runs its class's variant, and answers
    for device_id, device_class in DEVICES.items():
        state = OtaStateStore(site.tmp_path / device_id / "state").load().models["home-lm"]
        assert state.active is not None
        assert state.slots[state.active].variant == want[device_class], device_id
        with LocalClient(site.tmp_path / device_id / "agent.sock", timeout=60) as client:
            assert client.generate("home-lm", PROMPT).text()
