"""``fleetlite demo``: the whole product on one machine, in about a minute.

It starts a broker (Mosquitto when installed, else the embedded Python broker), creates signing
keys and a root of trust, starts three real agent processes of different device classes serving
the project's text intent model, builds and signs a new release of that model, rolls it out in
waves with a live progress display, shows the performance profiles the devices measured per
device class, asks an agent a few smart-home commands through its local socket, rolls out a
deliberately broken release that the devices reject, then rolls out the project's small language
model (home-lm: its tokenizer and prompt format travel with it, every device smoke-tests its
greedy replies) and streams its answer to "turn off the kitchen lights" from one gateway's local
socket, and writes the HTML report. Everything runs
under one work directory; ``--keep`` leaves broker, agents and controller running for exploring
with the CLI. Broker and agents end with the demo's process, even when it is killed with SIGKILL.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from fleetlite.fleet.broker import LocalBroker, mosquitto_path, start_local_broker
from fleetlite.fleet.controller import Controller
from fleetlite.fleet.errors import FleetError
from fleetlite.fleet.intent_model import intent_classifier
from fleetlite.fleet.release_builder import build_release
from fleetlite.fleet.rollout import RolloutState
from fleetlite.fleet.store import Store, open_store
from fleetlite.sdk.bundle import ReleaseBundle
from fleetlite.sdk.child_lifetime import start_tied
from fleetlite.sdk.keys import SigningKey
from fleetlite.sdk.local_client import LocalClient
from fleetlite.sdk.manifest import file_entry
from fleetlite.sdk.out_dirs import missing_dirs, say_created
from fleetlite.sdk.smoke import SmokeVectors
from fleetlite.sdk.text import Tokenizer
from fleetlite.sdk.trust import new_root, root_envelope

# the project's LM (tools/train_lm.py made it), package data beside this module
LM_DIR = Path(__file__).resolve().parent / "lm"
LM_TEMPLATE = "<user> {prompt} <bot>"
LM_QUESTION = "turn off the kitchen lights"

DEVICES = (
    ("gw-pi4-01", "raspberry-pi-4", {"site": "berlin"}),
    ("gw-pi4-02", "raspberry-pi-4", {"site": "hamburg"}),
    ("gw-jetson-01", "jetson-orin-nano", {"site": "lab"}),
    ("gw-x86-01", "industrial-x86-gateway", {"site": "plant-7"}),
)
SAMPLE_COMMANDS = (
    "turn off the kitchen lights",
    "set the thermostat to 21 degrees",
    "lock the front door",
    "play some jazz in the living room",
)
BAR = 24


def say(text: str = "") -> None:
    print(text, flush=True)


def step(number: int, text: str) -> None:
    say(f"\n[{number}] {text}")


class Demo:
    def __init__(self, workdir: Path, *, keep: bool) -> None:
        self.dir = workdir
        self.keep = keep
        self.broker: LocalBroker | None = None
        self.agents: list[subprocess.Popen[bytes]] = []
        self.controller: Controller | None = None
        self.store: Store | None = None
        self.started = time.monotonic()

    # -- set-up ----------------------------------------------------------------------------

    def start_broker(self, prefer: str = "auto") -> LocalBroker:
        self.broker = start_local_broker(prefer=prefer)
        note = ""
        if self.broker.kind != "mosquitto":
            note = " (no Mosquitto installed)" if mosquitto_path() is None else " (as asked)"
        say(f"    broker: {self.broker.kind}{note} on {self.broker.host}:{self.broker.port}")
        return self.broker

    def make_keys(self) -> SigningKey:
        keys = self.dir / "keys"
        keys.mkdir(parents=True, exist_ok=True)
        root_key = SigningKey.generate("root")
        release_key = SigningKey.generate("release")
        root_key.save(keys / f"root-{root_key.keyid[:12]}.key")
        release_key.save(keys / f"release-{release_key.keyid[:12]}.key")
        root = new_root([root_key.public_key], [release_key.public_key],
                        expires=int(time.time()) + 365 * 86400)
        (self.dir / "root.json").write_bytes(root_envelope(root).sign(root_key).to_json())
        say(f"    root key {root_key.keyid[:12]}, release key {release_key.keyid[:12]} "
            f"(in {keys}), root.json pinned on every device")
        return release_key

    def seed_model(self) -> Path:
        models = self.dir / "models"
        models.mkdir(parents=True, exist_ok=True)
        v1 = intent_classifier()
        for name, content in v1.files().items():
            (models / name).write_bytes(content)
        return models / "intent_classifier.tflite"

    def start_agents(self, seed: Path) -> None:
        assert self.broker is not None
        for device_id, device_class, tags in DEVICES:
            home = self.dir / "agents" / device_id
            home.mkdir(parents=True, exist_ok=True)
            config = {
                "device_id": device_id, "device_class": device_class, "tags": tags,
                "broker": {"host": self.broker.host, "port": self.broker.port},
                "state_dir": str(home / "state"), "socket": str(home / "agent.sock"),
                "trust_root": str(self.dir / "root.json"),
                # one machine plays four gateways: one interpreter thread each, so they do not
                # fight over the cores (real devices use their class's default_threads)
                "threads": 1,
                "intervals": {"telemetry_s": 5, "reconnect_min_s": 0.2, "reconnect_max_s": 2},
                "ota": {"health_inferences": 5, "health_timeout_s": 1},
                "models": [{"name": "intent", "path": str(seed), "version": 1}],
            }
            (home / "agent.yaml").write_text(yaml.safe_dump(config))
            log = (home / "agent.log").open("ab")
            # SIGTERM when this process dies, however it dies: no agent outlives the demo
            self.agents.append(start_tied(
                [sys.executable, "-m", "fleetlite.agent.cli", "run", "--config",
                 str(home / "agent.yaml")], death_signal=signal.SIGTERM, stdout=log, stderr=log))
            log.close()
            say(f"    agent {device_id:<14} {device_class:<24} pid {self.agents[-1].pid}")

    def start_controller(self) -> Store:
        assert self.broker is not None
        self.store = open_store(f"sqlite:///{self.dir / 'fleet.db'}")
        self.controller = Controller(self.store, self.broker.host, self.broker.port,
                                     tick_s=0.3).start()
        return self.store

    def wait_for_devices(self, timeout: float = 60.0) -> None:
        assert self.store is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            online = [d for d in self.store.list_devices() if d.online and d.models]
            if len(online) == len(DEVICES):
                say(f"    {len(online)} devices online, all serving intent v1")
                return
            time.sleep(0.2)
        raise FleetError("the agents did not come online; see their logs under "
                         f"{self.dir / 'agents'}")

    # -- releases and rollouts -------------------------------------------------------------

    def release(self, version: int, key: SigningKey, *, broken: bool = False) -> ReleaseBundle:
        models = self.dir / "models"
        good = intent_classifier(seed=1000 + version, steps=400)
        path = models / f"intent_v{version}.tflite"
        path.write_bytes(good.tflite)
        bundle = build_release([path], name="intent", version=version,
                               device_classes=sorted({c for _, c, _ in DEVICES}),
                               vocab=models / "intent_classifier.vocab.json", keys=[key])
        if broken:
            bundle = self._break(bundle, key, version)
        assert self.store is not None
        self.store.add_release(bundle.release_id, "intent", version, bundle.envelope.to_json(),
                               dict(bundle.files), bundle.manifest.to_dict())
        return bundle

    @staticmethod
    def _break(bundle: ReleaseBundle, key: SigningKey, version: int) -> ReleaseBundle:
        """A properly signed release whose model answers every command wrongly: the smoke
        vectors (computed from the good model) catch it on every device."""
        import json

        from fleetlite.sdk.envelope import Envelope
        from fleetlite.sdk.manifest import parse_manifest

        wrong = intent_classifier(seed=1000 + version, steps=400, scramble_labels=True).tflite
        files = dict(bundle.files)
        model_file = bundle.manifest.model.file
        files[model_file] = wrong
        doc = json.loads(bundle.envelope.payload)
        doc["files"] = [file_entry(f["name"], files[f["name"]], f["role"]).to_dict()
                        for f in doc["files"]]
        payload = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        envelope = Envelope(bundle.envelope.payload_type, payload).sign(key)
        SmokeVectors.from_json(files[bundle.manifest.smoke.file])  # unchanged: from the good one
        return ReleaseBundle(envelope, parse_manifest(payload), files)

    def rollout(self, rollout_id: str, bundle: ReleaseBundle, previous: int | None,
                on_failure: str = "pause", gates: Any = None) -> RolloutState:
        from fleetlite.fleet.gates import GateSpec
        from fleetlite.fleet.rollout import RolloutSpec, Selector, parse_waves

        assert self.store is not None
        model = bundle.manifest.name
        lm = bundle.manifest.generation is not None
        spec = RolloutSpec(
            rollout_id=rollout_id, release_id=bundle.release_id, model=model,
            version=bundle.manifest.version, previous_version=previous, selector=Selector(),
            waves=parse_waves("1,50%,100%"), wave_timeout_s=60, on_failure=on_failure,
            gates=gates or GateSpec(max_p95_regression=1.0, p95_floor_ms=0.5),
            # a 2 MB language model travels in 64 KiB chunks
            chunk_size=65536 if lm else 4096,
        )
        self.store.create_rollout(rollout_id, bundle.release_id, spec.to_dict())
        if gates is None:
            gate = "latency gate p95 +100%"
        elif gates.max_decode_regression is not None and previous is not None:
            gate = (f"gates: TTFT +{gates.max_ttft_regression:.0%}, decode rate "
                    f"-{gates.max_decode_regression:.0%}")
        else:
            gate = "smoke test: greedy replies"
        say(f"    rollout {rollout_id}: {model} v{spec.version}, waves 1 device / 50% / 100%, "
            f"{gate}")
        state = self.watch(rollout_id)
        self.wait_for_births(state, model, spec.version, previous)
        return state

    def wait_for_births(self, state: RolloutState, model: str, version: int,
                        previous: int | None, timeout: float = 30.0) -> None:
        """Until every device the rollout installed on announces ``version`` in its stored
        birth, and every device it rolled back (a class a gate excluded) ``previous``: a
        device's final status comes before its new birth, and ``fleetlite devices list``
        (suggested next) shows births."""
        from fleetlite.fleet.rollout import INSTALLED, ROLLBACK_SENT, ROLLED_BACK

        assert self.store is not None
        expected = {d: version for d, dev in state.devices.items() if dev.status == INSTALLED}
        if previous is not None:
            expected.update({d: previous for d, dev in state.devices.items()
                             if dev.status in (ROLLBACK_SENT, ROLLED_BACK)})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            announced = {(d.device_id, m.version) for d in self.store.list_devices()
                         for m in d.models if m.name == model}
            if set(expected.items()) <= announced:
                return
            time.sleep(0.2)
        say(f"    (not every device announced the {model} version the rollout left it with "
            f"within {timeout:g} s)")

    def lm_release(self, version: int, key: SigningKey) -> ReleaseBundle:
        """The project's LM and its SentencePiece tokenizer: v1 float32 with its int8 variant,
        v2 the fine-tune that confirms with "done, ..." (tools/finetune_lm.py)."""
        models = ([LM_DIR / "home_lm.tflite", LM_DIR / "home_lm_int8.tflite"] if version == 1
                  else [LM_DIR / "home_lm_v2.tflite"])
        bundle = build_release(
            models, name="home-lm",
            version=version, device_classes=sorted({c for _, c, _ in DEVICES}), keys=[key],
            tokenizer=LM_DIR / "home_lm.spm.model", prompt_template=LM_TEMPLATE,
            smoke_prompts=[LM_QUESTION, "lock the front door"], smoke_tokens=12)
        assert self.store is not None and bundle.manifest.generation is not None
        self.store.add_release(bundle.release_id, "home-lm", version,
                               bundle.envelope.to_json(), dict(bundle.files),
                               bundle.manifest.to_dict())
        g = bundle.manifest.generation
        sizes = ", ".join(f"{f.name} {f.length / 2**20:.1f} MiB" for f in bundle.manifest.files
                          if f.role == "model")
        say(f"    release {bundle.release_id[:16]}: {sizes}; tokenizer {g.tokenizer} "
            f"({g.vocab_size} pieces), {g.num_layers} layers, context {g.context_length}")
        return bundle

    def ask_lm(self, device_id: str) -> None:
        """Stream the device's LM reply to the terminal as it is produced."""
        home = self.dir / "agents" / device_id
        with LocalClient(home / "agent.sock", timeout=60) as client:
            sys.stdout.write(f"    {LM_QUESTION!r} -> ")
            sys.stdout.flush()
            with client.generate("home-lm", LM_QUESTION) as stream:
                for piece in stream:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            stats = (stream.result or {}).get("stats", {})
        say(f"\n    ({stats.get('generated_tokens')} tokens; time to first token "
            f"{stats.get('time_to_first_token_ms', 0):.1f} ms, decode "
            f"{stats.get('decode_tokens_per_s', 0):.0f} tokens/s; the prompt and the reply "
            "never left the device)")

    def watch(self, rollout_id: str, timeout: float = 120.0) -> RolloutState:
        assert self.store is not None
        deadline = time.monotonic() + timeout
        tty = sys.stdout.isatty()
        last = ""
        while True:
            record = self.store.get_rollout(rollout_id)
            state = RolloutState.from_stored(record.state) if record else None
            if state is not None:
                lines = self._progress_lines(state)
                text = "\n".join(lines)
                if text != last:
                    if tty and last:
                        sys.stdout.write(f"\x1b[{last.count(chr(10)) + 1}F\x1b[J")
                    say(text)
                    last = text
                if state.finished:
                    return state
            if time.monotonic() > deadline:
                raise FleetError(f"rollout {rollout_id} did not finish in {timeout:g} s")
            time.sleep(0.3)

    @staticmethod
    def _progress_lines(state: RolloutState) -> list[str]:
        waves = sorted({d.wave for d in state.devices.values() if d.wave})
        lines = []
        for wave in waves:
            counts = state.counts(wave)
            total = sum(counts.values()) or 1
            done = counts.get("installed", 0) + counts.get("no_change", 0)
            bad = sum(counts.get(k, 0) for k in ("rejected", "failed", "rolled_back",
                                                 "timed_out"))
            filled = round(BAR * done / total)
            failed = round(BAR * bad / total)
            bar = "#" * filled + "x" * failed + "." * (BAR - filled - failed)
            detail = ", ".join(f"{k} {v}" for k, v in counts.items())
            lines.append(f"    wave {wave} [{bar}] {detail}")
        lines.append(f"    state: {state.state}" + (f" — {state.reason}" if state.reason else ""))
        return lines

    # -- showing ---------------------------------------------------------------------------

    def show_profiles(self, model: str = "intent") -> None:
        from fleetlite.fleet.profiles_view import ProfileRow, aggregate, render

        assert self.store is not None
        rows = [ProfileRow.from_stored(r) for r in self.store.profiles(model=model)]
        say(render(aggregate(rows, model=model), "table"))

    def ask(self, device_id: str) -> None:
        home = self.dir / "agents" / device_id
        tokenizer = Tokenizer.from_file(self.dir / "models" / "intent_classifier.vocab.json")
        with LocalClient(home / "agent.sock") as client:
            for text in SAMPLE_COMMANDS:
                probabilities = next(iter(client.infer("intent",
                                                       tokenizer.encode(text)).values()))[0]
                best = int(probabilities.argmax())
                say(f"    {text!r:<38} -> {tokenizer.labels[best]:<16} ({probabilities[best]:.0%})")

    def broken_outcomes(self, release_id: str) -> None:
        assert self.store is not None
        for device_id, status in sorted(self.store.latest_ota_statuses(release_id).items()):
            if status.final:
                say(f"    {device_id:<14} {status.outcome:<12} {status.reason}")

    def serving(self) -> None:
        assert self.store is not None
        time.sleep(0.5)  # let the last births land
        versions = {d.device_id: [m.version for m in d.models if m.name == "intent"]
                    for d in self.store.list_devices()}
        served = sorted({v for vs in versions.values() for v in vs if v is not None})
        say(f"    the devices serve intent version(s) {', '.join(map(str, served))}: the active "
            "model kept serving")

    def report(self) -> Path:
        from fleetlite.fleet.client import Fleet

        assert self.broker is not None
        path = self.dir / "report.html"
        with Fleet(db=f"sqlite:///{self.dir / 'fleet.db'}",
                   broker=f"{self.broker.host}:{self.broker.port}") as fleet:
            fleet.report(path)
        return path

    # -- tear-down -------------------------------------------------------------------------

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
        for agent in self.agents:
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
        for agent in self.agents:
            try:
                agent.wait(15)
            except subprocess.TimeoutExpired:
                agent.kill()
        if self.store is not None:
            self.store.close()
        if self.broker is not None:
            self.broker.stop()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_demo(out: str | None = None, *, keep: bool = False, broker: str = "auto") -> int:
    workdir = Path(out) if out else Path(tempfile.mkdtemp(prefix="fleetlite-demo-"))
    created = missing_dirs(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    say_created(created)
    demo = Demo(workdir, keep=keep)
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (kill, systemd, a CI runner) cleans up like Ctrl-C: no orphaned agents
        signal.signal(signal.SIGTERM, _interrupt)
        # and Ctrl-C (SIGINT) even when started from a background job or a tool that ignores
        # it: Python raises KeyboardInterrupt only if SIGINT was not ignored when it started
        signal.signal(signal.SIGINT, _interrupt)
    say(f"FleetLite demo — working in {workdir}")
    try:
        step(1, "Starting a broker")
        demo.start_broker(broker)
        step(2, "Creating signing keys and the root of trust")
        key = demo.make_keys()
        step(3, "Starting agents of three device classes, serving the text intent model v1")
        demo.start_agents(demo.seed_model())
        demo.start_controller()
        demo.wait_for_devices()
        step(4, "Building and signing release intent v2, rolling it out in waves")
        v2 = demo.release(2, key)
        say(f"    release {v2.release_id[:16]}, signed by {key.keyid[:12]}")
        state = demo.rollout("intent-v2", v2, previous=1)
        step(5, "Performance profiles measured on the devices, per device class")
        demo.show_profiles()
        step(6, "Asking gw-pi4-01 through its local socket (inputs never leave the device)")
        demo.ask("gw-pi4-01")
        step(7, "Rolling out a broken release (intent v3: signed, but wrong answers)")
        v3 = demo.release(3, key, broken=True)
        broken = demo.rollout("intent-v3", v3, previous=2, on_failure="rollback")
        demo.broken_outcomes(v3.release_id)
        demo.serving()
        step(8, "Rolling out the on-device language model home-lm v1 (tokenizer and prompt "
             "format travel with it)")
        from fleetlite.fleet.gates import GateSpec

        lm = demo.lm_release(1, key)
        lm_state = demo.rollout("home-lm-v1", lm, previous=None,
                                gates=GateSpec(max_p95_regression=None, min_profiles=0))
        step(9, "Asking gw-pi4-01's language model through its local socket (streamed)")
        demo.ask_lm("gw-pi4-01")
        step(10, "Rolling out a fine-tuned home-lm v2, gated on time to first token and decode "
             "rate per device class")
        lm_v2 = demo.lm_release(2, key)
        # generous limits: four gateways share this machine's cores, so timings are noisy
        lm_v2_state = demo.rollout("home-lm-v2", lm_v2, previous=1, gates=GateSpec(
            max_p95_regression=None, max_ttft_regression=2.0, max_decode_regression=0.6))
        demo.ask_lm("gw-pi4-01")
        step(11, "The language model's profiles per device class: TTFT, prefill and decode "
             "tokens/s, peak memory")
        demo.show_profiles("home-lm")
        step(12, "Writing the HTML report")
        report = demo.report()
        say(f"    {report}")
        elapsed = time.monotonic() - demo.started
        say(f"\nDone in {elapsed:.0f} s: v2 {state.state}, broken v3 {broken.state}, "
            f"home-lm v1 {lm_state.state}, v2 {lm_v2_state.state}. Report: {report}")
        if keep:
            assert demo.broker is not None
            say("\n--keep: broker, agents and controller keep running. Try:\n"
                f"  export FLEETLITE_DB=sqlite:///{workdir / 'fleet.db'} "
                f"FLEETLITE_BROKER={demo.broker.host}:{demo.broker.port}\n"
                "  fleetlite devices list\n  fleetlite rollout list\n"
                "  fleetlite profiles show --model intent\n"
                "Press Ctrl-C (or send SIGTERM) to stop everything.")
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                say("Stopping the agents, the controller and the broker ...")
        return 0 if state.state == lm_state.state == "completed" else 1
    finally:
        demo.stop()  # the work directory stays: it holds the report and the logs
