"""Shadow rollouts end to end: real agent processes serving the project's LM v1 on their local
socket, a real Mosquitto, a real controller and store. Live greedy requests go to each device
while the rollout shadows a candidate on every device:

- the LM's real fine-tune (fleet/lm/home_lm_v2.tflite) disagrees on some greedy tokens: with a
  minimum agreement of 98 % the rollout stops before any device switches (every device still
  serves v1, its OTA state has no v2, its shadow was stopped);
- the same weights re-released (as v3) agree: the rollout promotes them, every device ends on v2
  without downloading it again;
- ``rollout status -o json`` shows the verdict, agreement, samples and the active model's p95
  alone vs shadowed vs the budget;
- a collector subscribed to every device topic sees no prompt, reply or token ids.
"""

from __future__ import annotations

import json

import pytest
import sentencepiece

from fleetlite.agent.ota_state import OtaStateStore
from fleetlite.fleet import Fleet
from fleetlite.fleet.gates import GateSpec
from fleetlite.fleet.release_builder import build_release
from fleetlite.fleet.rollout import ShadowSpec
from fleetlite.sdk import topics
from fleetlite.sdk.bundle import ReleaseBundle
from fleetlite.sdk.local_client import LocalClient
from tests.agent_harness import AgentProcess, write_config
from tests.mqtt_harness import Collector
from tests.test_fleet_e2e import (  # noqa: F401 (site: the imported fixture)
    FAST,
    OTA_SETTINGS,
    Site,
    site,
    wait_until,
)
from tests.test_generation import LM
from tests.test_ota_install import ISSUED, RELEASE_KEY, write_root

DEVICES = {"gw-1": FAST, "gw-2": FAST}
TEMPLATE = "<user> {prompt} <bot>"
PROMPTS = ["turn off the kitchen lights", "lock the front door", "play some jazz",
           "set a timer for ten minutes"]
NO_GATES = GateSpec(max_p95_regression=None, min_profiles=0)
# (a) is judged on agreement alone (no latency budget): the fine-tune must be stopped for what
# it says, whatever the machine's load does to latencies.
DISAGREE = ShadowSpec(min_agreement=0.98, min_samples=10, sample_rate=0.5, cpu_budget=1.0,
                      kind="lm", timeout_s=120.0, p95_budget_ratio=None)
# (b) is judged on agreement and on what shadowing costs the active model. A decode step here
# takes ~0.5 ms; two agents, their candidates and the test's clients share 2 cores, and a step
# that overlaps a candidate run in the same process can wait for the GIL (a switch interval is
# 5 ms): measured x1.1-x1.6 on a quiet machine, x3.9 once, x9.8 beside two CPU hogs. A real
# gateway's budget is the default x1.25; this one is x20, so that the test checks the figures
# are judged (>= 20 overlapped steps on a device) and within the budget on a loaded machine
# too (a cost over budget failing the class is tested in test_rollout_shadow).
AGREE = ShadowSpec(min_agreement=0.98, min_samples=10, sample_rate=0.5, cpu_budget=1.0,
                   kind="lm", timeout_s=120.0, p95_budget_ratio=20.0)


def release(model: str, version: int) -> ReleaseBundle:
    return build_release([LM / model], name="home-lm", version=version, device_classes=[FAST],
                         issued=ISSUED, keys=[RELEASE_KEY], tokenizer=LM / "home_lm.spm.model",
                         prompt_template=TEMPLATE, smoke_prompts=PROMPTS[:2], smoke_tokens=8)


def start_agents(at: Site) -> None:
    """Agents serving home-lm v1 (the project's LM and its tokenizer) from their config, one
    thread each, shadow reports every second."""
    root = write_root(at.tmp_path / "root.json")
    for device_id, device_class in DEVICES.items():
        config = write_config(
            at.tmp_path / device_id, port=at.broker.port, device_id=device_id, socket=True,
            extra={"device_class": device_class, "trust_root": str(root), "threads": 1,
                   "ota": {**OTA_SETTINGS, "shadow_report_s": 1},
                   "models": [{"name": "home-lm", "path": str(LM / "home_lm.tflite"),
                               "version": 1, "tokenizer": str(LM / "home_lm.spm.model"),
                               "prompt_template": TEMPLATE}]})
        at.agents[device_id] = AgentProcess(config).start()


class Asker:
    """Greedy live requests to each device's local socket; keeps what was asked and answered."""

    def __init__(self, at: Site) -> None:
        self.site = at
        self.asked: list[tuple[str, str, list[int]]] = []
        self.turn = 0
        self.tokenizer = sentencepiece.SentencePieceProcessor(
            model_file=str(LM / "home_lm.spm.model"))

    def ask_each(self) -> None:
        for device_id in DEVICES:
            # back to back on one device: the next request overlaps the candidate's run of the
            # one before (the active model's "shadowed" latencies)
            with LocalClient(self.site.tmp_path / device_id / "agent.sock",
                             timeout=60) as client:
                for _ in range(3):
                    prompt = PROMPTS[self.turn % len(PROMPTS)]
                    self.turn += 1
                    text = client.generate("home-lm", prompt, temperature=0.0,
                                           max_tokens=8).text()
                    # the reply's token ids (the local API streams text): what a leak carries
                    self.asked.append((prompt, text, list(self.tokenizer.encode(text))))


def shadow_rollout(at: Site, fleet: Fleet, bundle: ReleaseBundle, asker: Asker,
                   rollout_id: str, shadow: ShadowSpec) -> None:
    at.store.add_release(bundle.release_id, "home-lm", bundle.manifest.version,
                           bundle.envelope.to_json(), dict(bundle.files),
                           bundle.manifest.to_dict())
    fleet.create_rollout(bundle.release_id, rollout_id=rollout_id, waves="1,100%",
                         wave_timeout_s=120, chunk_size=65536, gates=NO_GATES,
                         previous_version=1, shadow=shadow)

    def settled() -> bool:
        rollout = fleet.rollout(rollout_id)
        if rollout.finished:
            return True
        if any(s.status == "shadowing" for s in rollout.shadows):
            asker.ask_each()  # live requests, so that samples accrue
        return False

    wait_until(settled, 180, f"rollout {rollout_id} to finish")


def active_version(at: Site, device_id: str) -> int:
    state = OtaStateStore(at.tmp_path / device_id / "state").load().models.get("home-lm")
    if state is None or state.active is None:
        return 1  # still the model the config serves
    return int(state.slots[state.active].version)


def status_json(rollout_id: str, store_url: str, capsys: pytest.CaptureFixture[str]) -> dict:
    from fleetlite.fleet.cli import main

    capsys.readouterr()
    assert main(["rollout", "status", rollout_id, "-o", "json", "--db", store_url]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_a_disagreeing_candidate_stops_before_any_switch_and_an_agreeing_one_is_promoted(
        site: Site, store_url: str, capsys: pytest.CaptureFixture[str],  # noqa: F811
) -> None:
    everything = Collector(site.broker.host, site.broker.port, [f"{topics.DEVICE_PREFIX}/#"],
                           client_id="test-every-device-message").start()
    try:
        start_agents(site)
        site.start_controllers(store_url, 1)
        wait_until(lambda: {d.device_id for d in site.store.list_devices(online=True)}
                   == set(DEVICES), 60, "every device online")
        asker = Asker(site)
        asker.ask_each()
        v1_replies = {text for _, text, _ in asker.asked}
        with Fleet(store_url) as fleet:
            # (a) the real fine-tune disagrees: stopped before any device switches
            tuned = release("home_lm_v2.tflite", 2)
            shadow_rollout(site, fleet, tuned, asker, "shadow-tuned", DISAGREE)
            stopped = fleet.rollout("shadow-tuned")
            assert stopped.state == "aborted", stopped.reason
            verdict = stopped.shadow_verdicts[FAST]
            assert verdict["verdict"] == "fail" and verdict["codes"] == ["low_agreement"], verdict
            assert {s.status for s in stopped.shadows} == {"stopped"}
            assert not any(d.status in ("sent", "installed") for d in stopped.devices)
            doc = status_json("shadow-tuned", store_url, capsys)
            row = doc["shadow"][0]
            assert row["verdict"] == "fail" and row["agreement"] < 0.98
            assert row["samples"] >= 10
            # (c) the figures: the active model's p95 alone vs while shadowed, the candidate's
            assert row["active_alone_p95_ms"] > 0 and row["active_shadowed_p95_ms"] > 0
            assert row["candidate_p95_ms"] > 0 and row["active_p95_budget_ms"] is None
            for device_id in DEVICES:
                assert active_version(site, device_id) == 1
                wait_until(lambda d=device_id: any(  # type: ignore[misc]
                    c.command == "shadow_stop" and c.ok
                    for c in site.store.command_history(d)), 30, f"{device_id} stopped")
            with LocalClient(site.tmp_path / "gw-1" / "agent.sock", timeout=60) as client:
                assert client.generate("home-lm", PROMPTS[0], temperature=0.0,
                                       max_tokens=8).text() in v1_replies

            # (b) the same weights re-released (as v3) agree: promoted, no second download
            # (v3: the store refuses a second v2 with other files, rightly)
            same = release("home_lm.tflite", 3)
            shadow_rollout(site, fleet, same, asker, "shadow-same", AGREE)
            promoted = fleet.rollout("shadow-same")
            assert promoted.completed, json.dumps(dict(promoted.shadow_verdicts))
            assert promoted.shadow_verdicts[FAST]["verdict"] == "pass"
            assert promoted.shadow_verdicts[FAST]["figures"]["agreement"] == 1.0
            assert {d.status for d in promoted.devices} == {"installed"}
            # the active model's p95 while shadowed stayed within its budget (or the floor)
            passed = status_json("shadow-same", store_url, capsys)["shadow"][0]
            assert passed["latency_judged_devices"] >= 1 and passed["within_budget"] is True
            assert passed["active_alone_p95_ms"] > 0 and passed["active_shadowed_p95_ms"] > 0
            assert passed["active_p95_budget_ms"] == pytest.approx(
                passed["active_alone_p95_ms"] * 20.0)
            for device_id in DEVICES:
                assert active_version(site, device_id) == 3
            # the shadow install downloaded the release once; the promotion did not again
            for device_id in DEVICES:
                mine = [(m.at, json.loads(m.payload)) for m in everything.messages
                        if m.topic.startswith(f"{topics.DEVICE_PREFIX}/{device_id}/")
                        and m.payload.startswith(b"{")
                        and json.loads(m.payload).get("release_id") == same.release_id]
                shadowing_at = next(at for at, body in mine
                                    if body.get("outcome") == "shadowing")
                assert any(body.get("schema") == "fleetlite.chunk_request/1"
                           for at, body in mine if at < shadowing_at)
                after = [body for at, body in mine if at > shadowing_at]
                assert any(body.get("outcome") == "installed" for body in after), device_id
                # (the promotion passes through the phase "downloading" with nothing to fetch)
                assert not any(body.get("schema") == "fleetlite.chunk_request/1"
                               or body.get("progress") for body in after), after
        # (d) nothing the devices published holds a prompt, a reply or token ids
        published = b"\n".join(m.payload for m in everything.messages)
        assert any(m.topic.endswith("/" + topics.SHADOW) for m in everything.messages)
        for prompt, text, tokens in asker.asked:
            assert prompt.encode() not in published
            if len(text.strip()) > 3:
                assert text.strip().encode() not in published, text
            if tokens:
                assert json.dumps(tokens).encode() not in published
                assert json.dumps(tokens, separators=(",", ":")).encode() not in published
    finally:
        everything.stop()
