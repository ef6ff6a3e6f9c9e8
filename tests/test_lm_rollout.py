"""A signed language-model release, end to end: real agent processes of two device classes, a
real Mosquitto, a real controller and store. The release (the project's LM with its tokenizer)
rolls out in waves; every device smoke-tests it (its greedy tokens) before switching, profiles it
(time to first token, tokens/s: what the fleet's per-class views and gates read), serves it on its
local socket with the reply the float reference gives, and the fleet knows each device runs it.
"""

from __future__ import annotations

import json
from pathlib import Path

from fleetlite.fleet import Fleet
from fleetlite.fleet.gates import GateSpec
from fleetlite.fleet.rollout import RolloutSpec, Selector, parse_waves
from fleetlite.sdk.bundle import ReleaseBundle, build_release
from fleetlite.sdk.local_client import LocalClient
from tests.test_fleet_e2e import Site, controllers_for, site, wait_until  # noqa: F401
from tests.test_generation import LM, reference
from tests.test_ota_install import ISSUED, RELEASE_KEY

DEVICES = {"gw-x86-1": "industrial-x86-gateway", "gw-pi-1": "raspberry-pi-4",
           "gw-pi-2": "raspberry-pi-4"}
PROMPT = "turn off the kitchen lights"


def lm_bundle() -> ReleaseBundle:
    return build_release([LM / "home_lm.tflite", LM / "home_lm_int8.tflite"], name="home-lm",
                         version=1, device_classes=sorted(set(DEVICES.values())),
                         issued=ISSUED, keys=[RELEASE_KEY], tokenizer=LM / "home_lm.spm.model",
                         prompt_template="<user> {prompt} <bot>",
                         smoke_prompts=[PROMPT, "lock the front door"], smoke_tokens=12)


def test_an_lm_release_rolls_out_in_waves_and_every_device_serves_it(
        site: Site, store_url: str, models_dir: Path,  # noqa: F811 (the imported fixture)
) -> None:
    site.start_agents(DEVICES, "intent", models_dir / "intent_classifier.tflite", socket=True)
    site.start_controllers(store_url, controllers_for(store_url))
    wait_until(lambda: {d.device_id for d in site.store.list_devices(online=True)}
               == set(DEVICES), 60, "every device online")
    bundle = lm_bundle()
    site.store.add_release(bundle.release_id, "home-lm", 1, bundle.envelope.to_json(),
                           dict(bundle.files), bundle.manifest.to_dict())
    spec = RolloutSpec(rollout_id="lm-1", release_id=bundle.release_id, model="home-lm",
                       version=1, previous_version=None, selector=Selector(),
                       waves=parse_waves("1,100%"), wave_timeout_s=120,
                       gates=GateSpec(max_p95_regression=None, min_profiles=0),
                       chunk_size=65536)
    site.store.create_rollout("lm-1", bundle.release_id, spec.to_dict())

    wait_until(lambda: site.settled("lm-1"), 60, "the LM rollout to finish")
    state = site.state("lm-1")
    assert state.state == "completed", state.reason
    assert {d.status for d in state.devices.values()} == {"installed"}
    assert sorted({d.wave for d in state.devices.values()}) == [1, 2]
    assert site.final_statuses(bundle.release_id) == {d: ["installed"] for d in DEVICES}
    # every device smoke-tested it before switching (its OTA statuses say so)
    assert site.collector is not None
    phases: dict[str, set[str]] = {}
    for message in site.collector.on_topic("/ota/status"):
        status = json.loads(message.payload)
        if status["release_id"] == bundle.release_id:
            phases.setdefault(status["device_id"], set()).add(status["phase"])
    assert all("smoke_testing" in seen for seen in phases.values()) and len(phases) == 3
    # the fleet knows each device runs it; each answers on its local socket
    wait_until(lambda: set(site.model_versions("home-lm").values()) == {1}, 30,
               "births with home-lm v1")
    # every device profiled it after the install: time to first token and tokens/s, per class
    wait_until(lambda: {p.device_id for p in site.store.profiles(model="home-lm", version=1)}
               == set(DEVICES), 120, "a home-lm profile from every device")
    for stored in site.store.profiles(model="home-lm", version=1):
        lm = stored.record().lm
        assert lm is not None, stored.device_id
        assert lm.ttft.warm_ms.mean > 0 and lm.decode[0].tokens_per_s.mean > 0
    with Fleet(store_url) as fleet:
        classes = {a.device_class: a for a in fleet.profiles(model="home-lm")}
    assert set(classes) == set(DEVICES.values())
    expected = next(c["reply"] for c in reference("home_lm")["prompts"] if c["prompt"] == PROMPT)
    for device_id in DEVICES:
        with LocalClient(site.tmp_path / device_id / "agent.sock", timeout=60) as client:
            assert client.generate("home-lm", PROMPT).text() == expected
