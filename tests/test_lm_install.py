"""OTA installs of generative language-model releases on a real OtaManager (real files, smoke
test subprocess, the project's LM from tests/fixtures/lm/): a signed LM release with its
tokenizer installs, is smoke-tested and served (its reply is the float reference's); hostile or
broken LM releases are refused with a specific reason and the active LM keeps serving.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
import sentencepiece

from fleetlite.agent.language_models import LanguageModels
from fleetlite.agent.model_service import ModelService
from fleetlite.agent.ota import OtaManager, OtaSettings
from fleetlite.agent.ota_state import OtaStateStore
from fleetlite.fleet.intent_model import intent_classifier
from fleetlite.fleet.release_builder import build_release
from fleetlite.fleet.release_smoke import run_bundle_smoke
from fleetlite.sdk.bundle import ReleaseBundle
from fleetlite.sdk.device_class import find_device_class
from fleetlite.sdk.envelope import Envelope
from fleetlite.sdk.errors import BundleError
from fleetlite.sdk.manifest import release_id
from fleetlite.tools.lm_corpus import dialogues
from tests.ota_simulator import FleetSimulator, Served
from tests.test_generation import LM, reference
from tests.test_ota_install import CLASS, ISSUED, RELEASE_KEY, write_root

TEMPLATE = "<user> {prompt} <bot>"
PROMPTS = ["turn off the kitchen lights", "lock the front door"]
CHUNK = 64 * 1024  # a 2 MB model in 4 KiB chunks would overflow the OTA inbox (re-requested)


def lm_release(version: int, model: str = "home_lm.tflite", extra_models: Any = (),
               **kwargs: Any) -> ReleaseBundle:
    return build_release([LM / model, *extra_models], name="home-lm", version=version,
                         device_classes=[CLASS], issued=ISSUED, keys=[RELEASE_KEY],
                         tokenizer=LM / "home_lm.spm.model",
                         prompt_template=TEMPLATE, smoke_prompts=PROMPTS, smoke_tokens=8,
                         **kwargs)


def reply(prompt: str) -> str:
    return str(next(c["reply"] for c in reference("home_lm")["prompts"]
                    if c["prompt"] == prompt))


class LmDevice:
    """One OtaManager with a model service, language models, state dir and fake fleet."""

    def __init__(self, tmp_path: Path) -> None:
        self.state_dir = tmp_path / "state"
        self.fleet = FleetSimulator()
        self.models = ModelService()
        self.lms = LanguageModels()
        self.ota = OtaManager(
            device_id="gw-1", device_class=find_device_class(CLASS), state_dir=self.state_dir,
            models=self.models, link=self.fleet, root_path=write_root(tmp_path / "root.json"),
            threads=1, seeds={}, on_model_change=lambda name: None,
            settings=OtaSettings(manifest_timeout_s=2, chunk_idle_s=0.2,
                                 max_requests_without_progress=3, health_inferences=2,
                                 health_timeout_s=0.2),
            language_models=self.lms)
        self.ota.recover()
        self.ota.start()

    def install(self, bundle: ReleaseBundle, *, envelope: bytes | None = None,
                files: dict[str, bytes] | None = None) -> Any:
        envelope = envelope if envelope is not None else bundle.envelope.to_json()
        payload = Envelope.from_json(envelope, max_bytes=2**30, max_payload_bytes=2**30).payload
        manifest = json.loads(payload)
        contents = {**bundle.files, **(files or {})}
        self.fleet.serve(release_id(payload), Served(
            envelope, [contents[f["name"]] for f in manifest["files"]], CHUNK))
        count = len(self.fleet.finals()) + 1
        assert self.ota.cmd_install({"release_id": release_id(payload),
                                     "chunk_size": CHUNK})["accepted"]
        return self.fleet.wait_final(count)

    def answer(self, prompt: str) -> str:
        with self.lms.get("home-lm").service.stream(prompt) as stream:
            return "".join(chunk.text for chunk in stream)

    def installed_version(self) -> Any:
        ms = OtaStateStore(self.state_dir).load().models.get("home-lm")
        return None if ms is None else ms.installed_version


@pytest.fixture
def device(tmp_path: Path) -> Iterator[LmDevice]:
    d = LmDevice(tmp_path)
    yield d
    d.ota.stop()


@pytest.fixture(scope="module")
def v1() -> ReleaseBundle:
    return lm_release(1)


def test_an_lm_release_installs_and_serves_the_reference_reply(
        device: LmDevice, v1: ReleaseBundle) -> None:
    assert v1.manifest.generation is not None
    roles = {f.role for f in v1.manifest.files}
    assert roles == {"model", "smoke", "tokenizer"}
    final = device.install(v1)
    assert (final.outcome, final.reason) == ("installed", ""), final.message
    phases = [s.phase for s in device.fleet.statuses]
    assert "smoke_testing" in phases and "health_check" in phases
    for prompt in PROMPTS:
        assert device.answer(prompt) == reply(prompt)
    assert device.installed_version() == 1
    # a new agent process on the same state serves it again from its slot
    restarted = LanguageModels()
    again = OtaManager(
        device_id="gw-1", device_class=find_device_class(CLASS), state_dir=device.state_dir,
        models=ModelService(), link=FleetSimulator(), root_path=None, threads=1, seeds={},
        on_model_change=lambda name: None, language_models=restarted)
    (served,) = again.recover()
    assert served[0] == "home-lm" and served[2] == 1


def resign(bundle: ReleaseBundle, edit: Callable[[dict[str, Any]], None],
           files: dict[str, bytes] | None = None) -> bytes:
    """The bundle's manifest edited (file entries follow ``files``), signed again with the
    release key: hostile content that passes every signature and hash check."""
    doc = json.loads(bundle.envelope.payload)
    for entry in doc["files"]:
        content = (files or {}).get(entry["name"])
        if content is not None:
            entry["sha256"] = hashlib.sha256(content).hexdigest()
            entry["length"] = len(content)
    edit(doc)
    payload = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return Envelope(bundle.envelope.payload_type, payload, ()).sign(RELEASE_KEY).to_json()


def smaller_tokenizer(tmp: Path) -> bytes:
    """A SentencePiece model of 256 pieces trained on the project's corpus (0.1 s)."""
    text = tmp / "corpus.txt"
    text.write_text("\n".join(f"{q} {a}" for q, a in dialogues(seed=3, count=2000)))
    sentencepiece.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(tmp / "small"), vocab_size=256, model_type="bpe",
        minloglevel=2)
    return (tmp / "small.model").read_bytes()


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        doc["generation"][path] = value
    return edit


def test_hostile_lm_releases_are_refused_and_the_active_lm_keeps_serving(
        device: LmDevice, v1: ReleaseBundle, tmp_path: Path) -> None:
    assert device.install(v1).outcome == "installed"
    v2 = lm_release(2)
    classifier = intent_classifier().tflite
    tokenizer = smaller_tokenizer(tmp_path)
    cases: list[tuple[str, str, dict[str, bytes], Callable[[dict[str, Any]], None]]] = [
        ("tokenizer vocab smaller than the logits", "vocab_mismatch",
         {"home_lm.spm.model": tokenizer}, lambda doc: None),
        ("no decode signature (a classifier in its place)", "missing_decode",
         {"home_lm.tflite": classifier}, lambda doc: None),
        ("cache shapes that disagree with the metadata", "cache_shape_mismatch", {},
         _set("context_length", 64)),
        ("a stop id out of range", "ids_out_of_range", {}, _set("stop_ids", [9999])),
    ]
    for number, (case, reason, files, edit) in enumerate(cases, start=2):
        def edit_version(doc: dict[str, Any], edit: Any = edit, number: int = number) -> None:
            edit(doc)
            doc["version"] = number  # a refused version is remembered: each case its own
        final = device.install(v2, envelope=resign(v2, edit_version, files), files=files)
        assert (final.outcome, final.reason) == ("rejected", reason), (case, final.message)
        assert device.answer(PROMPTS[0]) == reply(PROMPTS[0]), case
        assert device.installed_version() == 1, case


def test_the_builder_refuses_what_devices_would(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="tokenizer"):
        build_release([LM / "home_lm.tflite"], name="home-lm", version=1,
                      device_classes=[CLASS])
    small = tmp_path / "small.model"
    small.write_bytes(smaller_tokenizer(tmp_path))
    with pytest.raises(BundleError, match="vocab_mismatch"):
        build_release([LM / "home_lm.tflite"], name="home-lm", version=1,
                      device_classes=[CLASS], tokenizer=small)
    with pytest.raises(BundleError, match="ids_out_of_range"):
        lm_release(1, stop_ids=[9999])
    with pytest.raises(BundleError, match="not a generative language model"):
        build_release([LM.parent / "models" / "intent_classifier.tflite"], name="intent",
                      version=1, device_classes=[CLASS], tokenizer=LM / "home_lm.spm.model")
    # a variant must reproduce the default's greedy tokens as often as declared ...
    with pytest.raises(BundleError, match="min-token-agreement"):
        lm_release(1, model="home_lm.tflite", min_token_agreement=1.0,
                   extra_models=[LM / "home_lm_int8.tflite"])
    # ... and share its generation metadata (alt_lm has another cache layout and context)
    with pytest.raises(BundleError, match="cache_shape_mismatch"):
        lm_release(1, extra_models=[LM / "alt_lm.tflite"])


def test_release_verify_smoke_runs_an_lm_release_here(tmp_path: Path) -> None:
    bundle = lm_release(1, extra_models=[LM / "home_lm_int8.tflite"])
    assert run_bundle_smoke(bundle) == []
    # the int8 variant judged as strictly as the float one fails, and says why
    doc = json.loads(bundle.files["home_lm_int8.smoke.json"])
    doc["min_token_agreement"] = 1.0
    strict = ReleaseBundle(bundle.envelope, bundle.manifest, {
        **bundle.files, "home_lm_int8.smoke.json": json.dumps(doc).encode()})
    problems = run_bundle_smoke(strict)
    assert problems and all(p.startswith("variant home_lm_int8:") for p in problems)


def test_float_and_int8_variants_travel_together(tmp_path: Path) -> None:
    bundle = build_release([LM / "home_lm.tflite", LM / "home_lm_int8.tflite"],
                           name="home-lm", version=1, device_classes=[CLASS], issued=ISSUED,
                           tokenizer=LM / "home_lm.spm.model", prompt_template=TEMPLATE,
                           smoke_prompts=PROMPTS, smoke_tokens=8, min_token_agreement=0.8)
    smoke = {v.name: json.loads(bundle.files[v.smoke.file])
             for v in bundle.manifest.all_variants()}
    assert smoke["default"]["min_token_agreement"] == 1.0
    assert smoke["home_lm_int8"]["min_token_agreement"] == 0.8
    assert smoke["default"]["cases"] == smoke["home_lm_int8"]["cases"]  # the float's tokens


FC12 = LM / "home_lm_int8_fc12.tflite"  # TF 2.21's default int8 export: FULLY_CONNECTED v12


def runtime_lacks_fc12() -> bool:
    from fleetlite.sdk.runtime.interpreter import select_backend

    return select_backend().name == "tflite-runtime"


@pytest.mark.skipif(not runtime_lacks_fc12(),
                    reason="only tflite-runtime 2.14 lacks FULLY_CONNECTED version 12")
def test_an_op_the_runtime_lacks_is_refused_at_build_and_on_the_device(
        device: LmDevice, v1: ReleaseBundle) -> None:
    # at build time, for a class that runs tflite-runtime: with the op's name and version
    with pytest.raises(BundleError, match="FULLY_CONNECTED version 12"):
        build_release([FC12], name="home-lm", version=2, device_classes=["raspberry-pi-4"],
                      tokenizer=LM / "home_lm.spm.model")
    # a release built elsewhere (its smoke vectors from the float model) reaches the device
    assert device.install(v1).outcome == "installed"
    v2 = lm_release(2)
    files = {"home_lm.tflite": FC12.read_bytes()}
    final = device.install(v2, envelope=resign(v2, lambda doc: None, files), files=files)
    assert (final.outcome, final.reason) == ("rejected", "invalid_model"), final.message
    assert "FULLY_CONNECTED version 12" in final.message
    assert device.answer(PROMPTS[0]) == reply(PROMPTS[0])
    assert device.installed_version() == 1
