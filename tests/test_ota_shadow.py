"""Shadow installs on the device (real OtaManager, real files, the real smoke-test subprocess,
the real interpreter and LM engine): the candidate runs beside the active model on its live
requests and only statistics leave the device; promoting it installs the kept files without a
download; ``shadow_stop`` ends it."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleetlite.agent.errors import AgentError
from fleetlite.fleet.ota_publisher import ReleasePublisher
from fleetlite.sdk import topics
from fleetlite.sdk.bundle import ReleaseBundle
from fleetlite.sdk.errors import LocalApiError
from fleetlite.sdk.local_client import LocalClient
from fleetlite.sdk.manifest import release_id
from fleetlite.sdk.messages import OtaStatus
from fleetlite.sdk.runtime.lm_engine import GenerateParams
from fleetlite.sdk.shadow import ShadowReport
from fleetlite.sdk.text import Tokenizer
from tests.agent_harness import AgentProcess
from tests.mqtt_harness import Collector, Mosquitto
from tests.ota_simulator import Served
from tests.test_lm_install import LmDevice, lm_release
from tests.test_ota_agent import agent_config, command, serving_version, wait_final
from tests.test_ota_install import CHUNK, Device
from tests.test_ota_install import release as classifier_release
from tests.test_ota_variants import send

PROMPTS = ["turn off the kitchen lights", "lock the front door", "what is the weather",
           "play some jazz in the living room", "set a timer for ten minutes"]
DEADLINE_S = 120.0


@pytest.fixture
def device(tmp_path: Path) -> Iterator[LmDevice]:
    d = LmDevice(tmp_path)
    yield d
    d.ota.stop()


@pytest.fixture(scope="module")
def releases() -> tuple[ReleaseBundle, ReleaseBundle]:
    """v1, the project's LM, and v2, its real fine-tune (which disagrees on some tokens)."""
    return lm_release(1), lm_release(2, model="home_lm_v2.tflite")


def ask(device: LmDevice, rounds: int = 4) -> list[tuple[str, str, list[int]]]:
    """Greedy live requests to the active model: (prompt, reply text, reply token ids)."""
    served = device.lms.get("home-lm")
    asked = []
    for _ in range(rounds):
        for prompt in PROMPTS:
            ids = served.service.engine.encode_prompt(prompt)
            with served.service.generate(ids, GenerateParams(temperature=0.0,
                                                             max_tokens=12)) as generation:
                tokens = list(generation)
            text = served.service.engine.tokenizer.decode(tokens)
            asked.append((prompt, text, tokens))
    return asked


def ask_until_sampled(device: LmDevice, samples: int
                      ) -> tuple[ShadowReport, list[tuple[str, str, list[int]]]]:
    """Live requests, a round at a time, until a shadow report counts ``samples`` of them: the
    report, and every request asked. On a loaded machine the runner's CPU budget and p95
    back-off skip some requests, so the number asked is not known in advance."""
    device.ota.shadows.report_every_s = 0.2  # a report per round asked, not every 30 s
    deadline = time.monotonic() + DEADLINE_S
    asked: list[tuple[str, str, list[int]]] = []
    while True:
        asked += ask(device, rounds=1)
        device.ota.shadows.tick()
        reports = device.fleet.shadow_reports
        if reports and reports[-1].samples >= samples:
            return reports[-1], asked
        assert time.monotonic() < deadline, f"no report with {samples} samples: {reports}"


def test_a_shadow_runs_beside_the_active_model_and_reports_only_statistics(
        device: LmDevice, releases: tuple[ReleaseBundle, ReleaseBundle]) -> None:
    v1, v2 = releases
    assert send(device, v1).outcome == "installed"
    final = send(device, v2, shadow=True, shadow_sample_rate=1.0, shadow_cpu_budget=1.0)
    assert (final.outcome, final.reason) == ("shadowing", ""), final.message
    assert device.installed_version() == 1  # nothing switched
    assert device.lms.get("home-lm").version == 1
    report, asked = ask_until_sampled(device, samples=10)
    assert (report.model, report.version, report.active_version) == ("home-lm", 2, 1)
    assert report.kind == "lm" and report.compared > 0
    assert report.agreement is not None and 0.0 < report.agreement < 1.0  # a real fine-tune
    assert report.active_alone_count + report.active_shadowed_count >= 1
    # every message the device published: statistics only, never a prompt, a reply or tokens
    published = b"\n".join(payload for _, payload in device.fleet.published)
    for prompt, text, tokens in asked:
        assert prompt.encode() not in published
        if len(text.strip()) > 3:
            assert text.strip().encode() not in published, text
        assert json.dumps(tokens).encode() not in published
        assert json.dumps(tokens, separators=(",", ":")).encode() not in published
    kinds = {kind for kind, _ in device.fleet.published}
    assert "shadow" in kinds


def test_promoting_a_shadowed_release_installs_its_kept_files_without_a_download(
        device: LmDevice, releases: tuple[ReleaseBundle, ReleaseBundle]) -> None:
    v1, v2 = releases
    assert send(device, v1).outcome == "installed"
    assert send(device, v2, shadow=True).outcome == "shadowing"
    sent = device.fleet.bytes_sent
    final = send(device, v2)
    assert (final.outcome, final.reason) == ("installed", ""), final.message
    assert device.fleet.bytes_sent == sent  # the kept files, not a second download
    assert device.installed_version() == 2
    assert device.ota.shadows.describe() == []  # the shadow ended with the promotion
    assert not any((device.state_dir / "ota" / "shadow").iterdir())
    assert device.fleet.shadow_reports  # its last report went out


def test_shadow_stop_ends_it_and_removes_its_files(
        device: LmDevice, releases: tuple[ReleaseBundle, ReleaseBundle]) -> None:
    v1, v2 = releases
    assert send(device, v1).outcome == "installed"
    assert send(device, v2, shadow=True).outcome == "shadowing"
    assert [s["version"] for s in device.ota.shadows.describe()] == [2]
    assert device.ota.cmd_shadow_stop({"model": "home-lm"}) == {"stopped": "home-lm"}
    assert device.ota.shadows.describe() == []
    assert not any((device.state_dir / "ota" / "shadow").iterdir())
    assert device.installed_version() == 1
    with pytest.raises(AgentError, match="shadows no release"):
        device.ota.cmd_shadow_stop({"model": "home-lm"})


def test_a_shadow_of_a_model_the_device_does_not_serve_fails_with_its_reason(
        device: LmDevice, releases: tuple[ReleaseBundle, ReleaseBundle]) -> None:
    _, v2 = releases
    final = send(device, v2, shadow=True)
    assert (final.outcome, final.reason) == ("failed", "shadow_unavailable"), final.message
    assert device.ota.shadows.describe() == []


@pytest.mark.parametrize(("args", "error"), [
    ({"shadow_kind": "ranker"}, "shadow_kind must be"),
    ({"shadow_kind": "regressor"}, "needs shadow_error_bound"),
    ({"shadow_sample_rate": 1.5}, "shadow_sample_rate must be"),
])
def test_bad_shadow_options_are_refused_before_anything_starts(
        device: LmDevice, args: dict[str, Any], error: str) -> None:
    with pytest.raises(Exception, match=error):
        device.ota.cmd_install({"release_id": "a" * 64, "shadow": True, **args})
    assert device.ota.state.job is None


# -- a shadow survives a restart of the agent ------------------------------------------------------


def shadow_classifier(device: Device, bundle: ReleaseBundle) -> OtaStatus:
    rid = release_id(bundle.envelope.payload)
    device.fleet.serve(rid, Served(bundle.envelope.to_json(),
                                   [bundle.files[f.name] for f in bundle.manifest.files], CHUNK))
    return device.send_install({"release_id": rid, "chunk_size": CHUNK, "shadow": True,
                                "shadow_sample_rate": 1.0, "shadow_cpu_budget": 1.0})


def test_a_shadow_survives_a_restart_and_is_promoted_from_its_kept_files(
        tmp_path: Path, models_dir: Path) -> None:
    bundle = classifier_release(models_dir, tmp_path, 2)
    rid = release_id(bundle.envelope.payload)
    first = Device(tmp_path, models_dir)
    try:
        assert shadow_classifier(first, bundle).outcome == "shadowing"
    finally:
        first.close()  # the agent stops (a restart): the shadow's files are kept
    again = Device(tmp_path, models_dir)
    try:
        assert [(s["release_id"], s["version"]) for s in again.ota.shadows.describe()] == [
            (rid, 2)]
        # the candidate runs again on live requests, with fresh statistics
        tokens = np.zeros((1, 16), np.int32)
        deadline = time.monotonic() + DEADLINE_S
        while again.ota.shadows.describe()[0]["samples"] < 5:
            again.models.infer("intent", tokens)
            assert time.monotonic() < deadline, again.ota.shadows.describe()
            time.sleep(0.01)
        assert again.ota.shadows.describe()[0]["agreement"] == 1.0  # the same model
        # installing the release promotes the kept files: nothing is downloaded
        again.fleet.serve(rid, Served(bundle.envelope.to_json(),
                                      [bundle.files[f.name] for f in bundle.manifest.files],
                                      CHUNK))
        final = again.send_install({"release_id": rid, "chunk_size": CHUNK})
        assert (final.outcome, final.reason) == ("installed", ""), final.message
        assert again.fleet.bytes_sent == 0
        assert again.serving_version() == 2
        assert again.ota.shadows.describe() == []
    finally:
        again.close()


@pytest.mark.parametrize("damage", ["a kept file changed", "no session recorded",
                                    "a session that is not JSON"])
def test_a_kept_shadow_that_does_not_check_out_is_removed_at_the_restart(
        tmp_path: Path, models_dir: Path, damage: str) -> None:
    bundle = classifier_release(models_dir, tmp_path, 2)
    first = Device(tmp_path, models_dir)
    try:
        assert shadow_classifier(first, bundle).outcome == "shadowing"
    finally:
        first.close()
    (kept,) = (first.state_dir / "ota" / "shadow").iterdir()
    if damage == "a kept file changed":
        model = kept / bundle.manifest.model.file
        model.write_bytes(model.read_bytes()[:-64] + b"\0" * 64)
    elif damage == "no session recorded":
        (kept / ".session.json").unlink()
    else:
        (kept / ".session.json").write_bytes(b"{not json")
    again = Device(tmp_path, models_dir)
    try:
        assert again.ota.shadows.describe() == []
        assert not kept.exists()
        assert again.serving_version() == 1  # the active model serves, as before
    finally:
        again.close()


def test_a_real_agent_killed_while_shadowing_shadows_again_after_its_restart(
        tmp_path: Path, broker: Mosquitto, models_dir: Path) -> None:
    """A real agent process, a real Mosquitto and the real publisher: kill -9 while shadowing,
    and the restarted agent reports the same candidate again, counted from its restart."""
    bundle = classifier_release(models_dir, tmp_path, 2)
    collector = Collector(broker.host, broker.port, [f"{topics.DEVICE_PREFIX}/#"]).start()
    config = agent_config(tmp_path, broker, models_dir, shadow_report_s=0.5)
    publisher = ReleasePublisher(broker.host, broker.port, client_id="fleet-publisher").start()
    agent = AgentProcess(config).start()
    try:
        publisher.serve(bundle, CHUNK)
        collector.wait_for(topics.BIRTH, timeout=60)
        assert command(collector, "ota_install", {
            "release_id": bundle.release_id, "chunk_size": CHUNK, "shadow": True,
            "shadow_sample_rate": 1.0, "shadow_cpu_budget": 1.0})["ok"]
        final = wait_final(collector)
        assert (final.outcome, final.reason) == ("shadowing", ""), final.message
        agent.kill9()
        restarted_at = time.time()
        agent = AgentProcess(config).start()
        tokens = Tokenizer.from_file(models_dir / "intent_classifier.vocab.json").encode(
            "turn off the kitchen lights")
        deadline = time.monotonic() + DEADLINE_S

        def resumed() -> list[ShadowReport]:
            reports = [ShadowReport.from_json(m.payload)
                       for m in collector.on_topic(topics.SHADOW)]
            return [r for r in reports if r.since >= restarted_at and r.samples > 0]

        while not resumed():
            assert agent.alive, "the restarted agent exited"
            assert time.monotonic() < deadline, "no shadow report after the restart"
            with contextlib.suppress(LocalApiError), \
                    LocalClient(tmp_path / "agent" / "agent.sock") as client:
                for _ in range(10):
                    client.infer("intent", tokens)
            time.sleep(0.1)
        report = resumed()[-1]
        assert (report.release_id, report.version, report.active_version) == (
            bundle.release_id, 2, 1)
        assert report.agreement == 1.0  # the same model: it agrees with itself
        assert serving_version(collector) == 1  # nothing switched
    finally:
        agent.stop()
        publisher.close()
        collector.stop()
