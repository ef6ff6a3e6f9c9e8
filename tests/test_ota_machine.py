"""The OTA receiver's state machine (agent/ota_machine.py) driven directly, without a broker, a
disk or a thread: a small in-memory world carries out its actions the way the agent's driver
does. The hostile-update table of tests/test_ota_install.py runs here too, and a kill at every
single action, with a restart from what had been made durable, still ends in one install."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub

from fleetlite.agent import ota_machine as m
from fleetlite.agent.ota_download import DownloadTracker
from fleetlite.sdk import topics
from fleetlite.sdk.bundle import ReleaseBundle
from fleetlite.sdk.chunks import ChunkBitmap, ChunkLayout, encode_frame, expand_ranges
from fleetlite.sdk.delta import apply_delta_bytes
from fleetlite.sdk.envelope import Envelope
from fleetlite.sdk.errors import DeltaError
from fleetlite.sdk.manifest import Manifest, release_id
from fleetlite.sdk.ota_progress import ProgressPacer
from fleetlite.sdk.trust import load_trusted_root
from fleetlite.sdk.version import BUILD_TIME, __version__
from tests.fuzz_settings import fuzz
from tests.test_ota_install import CLASS, HOSTILE, release, write_root

CHUNK = 4096
PASSED = m.SmokeDone(True)
SETTINGS = m.Settings(manifest_timeout_s=2, chunk_idle_s=0.2, max_requests_without_progress=3,
                      health_inferences=5, health_timeout_s=0.2)


@dataclass
class Disk:
    """What survives a kill: the persisted job phase, the staged manifest, written chunks (all
    durable here), and the slot state."""

    phase: str = "accepted"
    envelope: Optional[bytes] = None
    chunks: dict[tuple[int, int], bytes] = field(default_factory=dict)
    finalized: bool = False
    switched: bool = False
    committed: bool = False
    rejected: list[int] = field(default_factory=list)
    staged: dict[str, bytes] = field(default_factory=dict)  # finalized and rebuilt files


class KilledError(Exception):
    """The world stops here, as a kill -9 would stop the agent."""


class World:
    """Carries out the machine's actions in memory, like the driver in agent/ota.py.

    The "broker" holds every chunk of the served files retained: subscribing to a block or an
    exact chunk topic delivers those chunks, a request re-publishes the chunks it names.
    ``lose`` chunks are never delivered by subscriptions (a broker that dropped them), only in
    answer to a request. ``smoke`` is the smoke test's verdict; ``serving_errors`` the new
    model's errors in its health window.
    """

    def __init__(self, bundle: ReleaseBundle, *, envelope: Optional[bytes] = None,
                 files: Optional[list[bytes]] = None, root_path: Path,
                 installed: int = 1, disk: Optional[Disk] = None,
                 lose: frozenset[tuple[int, int]] = frozenset(),
                 smoke: m.SmokeDone = PASSED, serving_errors: int = 0,
                 kill_after: Optional[int] = None, variant: str = "",
                 bases: Optional[dict[str, bytes]] = None, probe: bool = False) -> None:
        self.envelope = envelope if envelope is not None else bundle.envelope.to_json()
        self.rid = release_id(Envelope.from_json(self.envelope or bundle.envelope.to_json(),
                                                 max_bytes=2**30,
                                                 max_payload_bytes=2**30).payload)
        self.contents = files if files is not None else [bundle.files[f.name]
                                                        for f in bundle.manifest.files]
        self.root = load_trusted_root(root_path.read_bytes())
        self.installed = installed
        self.disk = disk if disk is not None else Disk()
        self.lose = lose
        self.smoke = smoke
        self.serving_errors = serving_errors
        self.kill_after = kill_after
        self.variant = variant
        self.probe = probe
        self.bases = bases or {}  # sha256 -> content of the files the device keeps
        self.fetch: tuple[str, ...] = ()
        self.delivered_bytes = 0
        self.now = 1000.0
        self.done = 0
        self.inbox: list[m.Event] = []
        self.ends: list[m.End] = []
        self.requests: list[tuple[int, int]] = []
        self.phases: list[str] = []
        self.served = 0
        self.manifest: Optional[Manifest] = None
        self.actions: list[m.Action] = []
        self.notices: list[m.Notice] = []
        self.staged = self.disk.staged

    # -- running ---------------------------------------------------------------------------

    def trust(self) -> m.Trust:
        return m.Trust(root=self.root, device_class=CLASS, agent_version=__version__,
                       time_floor=BUILD_TIME, installed={"intent": self.installed},
                       rejected={"intent": tuple(self.disk.rejected)},
                       have=frozenset(self.bases))

    def run(self, limit: int = 20000) -> m.End:
        """Install (or resume) until the machine ends; its End."""
        job = m.JobSpec(self.rid, CHUNK, variant=self.variant, phase=self.disk.phase,
                        probe=self.probe)
        state, todo = m.handle(m.Receiver("gw-1", SETTINGS),
                               m.Start(job, self.trust(), self.now, self.disk.envelope))
        for _ in range(limit):
            while todo:
                action = todo.pop(0)
                event = self.do(action)
                if event is not None:
                    self.inbox.append(event)
                while self.inbox:
                    state, more = m.handle(state, self.inbox.pop(0))
                    todo.extend(more)
            if state.phase == m.IDLE:
                assert len(self.ends) == 1, self.ends
                return self.ends[0]
            self.now = max(self.now + 0.01, state.wake_at)
            if state.phase == m.HEALTH_CHECK:
                event: m.Event = m.HealthStats(self.served, self.serving_errors, self.now)
            else:
                event = m.Tick(self.now)
            state, todo = m.handle(state, event)
        raise AssertionError(f"the machine never ended (in {state.phase})")

    def do(self, action: m.Action) -> Optional[m.Event]:
        if self.kill_after is not None and self.done >= self.kill_after:
            raise KilledError
        self.done += 1
        self.actions.append(action)
        disk = self.disk
        if isinstance(action, m.Subscribe):
            if action.kind == "manifest":
                self.inbox.append(m.ManifestMessage(self.envelope))
            else:
                self.deliver(self._chunks_of(action), subscribed=True)
        elif isinstance(action, m.RequestChunks):
            wanted = list(expand_ranges(action.request.missing))
            self.requests.extend(wanted)
            self.deliver(wanted, subscribed=False)
        elif isinstance(action, m.EnterPhase):
            disk.phase = action.phase
            self.phases.append(action.phase)
        elif isinstance(action, m.StageManifest):
            disk.envelope = action.payload
        elif isinstance(action, m.RecordManifest):
            self.manifest = action.manifest
        elif isinstance(action, m.CheckSpace):
            return m.SpaceChecked("")
        elif isinstance(action, m.OpenDownload):
            self.fetch = action.fetch
            if disk.finalized and all(n in self.staged for n in action.fetch):
                return m.DownloadOpened(None, self.now)
            layout = ChunkLayout.from_manifest(action.manifest, action.chunk_size, action.fetch)
            have = ChunkBitmap(layout.counts)
            for f, i in disk.chunks:
                if i < layout.counts[f]:
                    have.set(f, i)
            return m.DownloadOpened(have, self.now)
        elif isinstance(action, m.WriteChunk):
            chunk = action.chunk
            disk.chunks[(chunk.file_index, chunk.index)] = bytes(chunk.data)
        elif isinstance(action, m.Finalize):
            return self.finalize()
        elif isinstance(action, m.Rebuild):
            return self.rebuild(action)
        elif isinstance(action, m.Notice):
            self.notices.append(action)
        elif isinstance(action, m.RunSmoke):
            return self.smoke
        elif isinstance(action, m.Reject):
            disk.rejected.append(action.version)
        elif isinstance(action, m.Switch):
            disk.switched = True
            return m.Done("a")
        elif isinstance(action, m.Exercise):
            self.served += 1
        elif isinstance(action, m.RollBack):
            disk.switched = False
        elif isinstance(action, m.Commit):
            disk.committed = True
            return m.Done()
        elif isinstance(action, m.End):
            self.ends.append(action)
        elif isinstance(action, (m.VerifyFiles,)):
            return m.Done()
        return None

    def _chunks_of(self, action: m.Subscribe) -> list[tuple[int, int]]:
        out = []
        for f, content in enumerate(self.contents):
            for i in range(-(-len(content) // CHUNK)):
                topic = topics.chunk_topic(self.rid, CHUNK, f, i)
                if any(topic_matches_sub(sub, topic) for sub in action.topics):
                    out.append((f, i))
        return out

    def deliver(self, chunks: list[tuple[int, int]], *, subscribed: bool) -> None:
        for f, i in chunks:
            if subscribed and (f, i) in self.lose:
                continue
            if f >= len(self.contents):
                continue
            data = self.contents[f][i * CHUNK:(i + 1) * CHUNK]
            self.delivered_bytes += len(data)
            if data:
                self.inbox.append(m.ChunkFrame(encode_frame(f, i * CHUNK, data), self.now))

    def finalize(self) -> m.Event:
        assert self.manifest is not None
        for f, entry in enumerate(self.manifest.files):
            if entry.name not in self.fetch:
                continue
            count = -(-entry.length // CHUNK)
            data = b"".join(self.disk.chunks[(f, i)] for i in range(count))
            if hashlib.sha256(data).hexdigest() != entry.sha256:
                for i in range(count):  # a bad file is fetched again, as the chunk store does
                    self.disk.chunks.pop((f, i), None)
                return m.Failed("rejected", "hash_mismatch", f"{entry.name} does not match")
            self.staged[entry.name] = data
        self.disk.finalized = True
        return m.Done()

    def rebuild(self, action: m.Rebuild) -> m.Event:
        ref = action.delta
        try:
            data = apply_delta_bytes(self.bases[ref.base_sha256], self.staged[ref.delta])
        except DeltaError as exc:
            return m.RebuildFailed(exc.reason, str(exc))
        entry = action.manifest.file(ref.file)
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            return m.RebuildFailed("delta_target_mismatch", "not the signed file")
        self.staged[ref.file] = data
        return m.Done()


@pytest.fixture
def root_path(tmp_path: Path) -> Path:
    return write_root(tmp_path / "root.json")


@pytest.fixture
def bundle(models_dir: Path, tmp_path: Path) -> ReleaseBundle:
    return release(models_dir, tmp_path, 2)


def test_an_install_walks_every_phase_and_ends_installed(bundle: ReleaseBundle,
                                                         root_path: Path) -> None:
    world = World(bundle, root_path=root_path)
    end = world.run()
    assert (end.outcome, end.reason) == ("installed", ""), end.message
    assert world.phases == ["downloading", "verifying", "smoke_testing", "switching",
                            "health_check"]
    assert world.disk.committed
    # the retained chunks came with the block subscriptions: nothing was asked for, and the
    # fleet was told when everything had arrived
    assert world.requests == []
    dones = [a for a in world.actions if isinstance(a, m.RequestChunks) and a.request.done]
    assert len(dones) == 1
    # every subscription was undone
    subscribed: set[str] = set()
    for action in world.actions:
        if isinstance(action, m.Subscribe):
            subscribed |= set(action.topics)
        elif isinstance(action, m.Unsubscribe):
            subscribed -= set(action.topics)
    assert subscribed == set()


def test_lost_chunks_are_asked_for_and_only_those(bundle: ReleaseBundle,
                                                  root_path: Path) -> None:
    layout = ChunkLayout.from_manifest(bundle.manifest, CHUNK)
    keys = [(f, i) for f, count in enumerate(layout.counts) for i in range(count)]
    lost = frozenset(keys[3::7])
    world = World(bundle, root_path=root_path, lose=lost)
    end = world.run()
    assert end.outcome == "installed", end.message
    # re-subscription rounds name exact topics (they do not bring lost chunks in this world)
    rounds = [a for a in world.actions if isinstance(a, m.Subscribe) and a.kind == "round"]
    assert rounds
    assert set(world.requests) == lost


@pytest.mark.parametrize(("case", "reason", "make"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_updates_end_with_their_reason_and_never_switch(
    bundle: ReleaseBundle, root_path: Path, models_dir: Path, tmp_path: Path, case: str,
    reason: str, make: Callable[[ReleaseBundle, Path, Path], dict[str, Any]],
) -> None:
    world = World(bundle, root_path=root_path, **make(bundle, models_dir, tmp_path))
    end = world.run()
    assert end.outcome in ("rejected", "failed") and end.reason == reason, end
    assert not world.disk.switched and not world.disk.committed
    assert not any(isinstance(a, (m.Switch, m.Commit, m.RunSmoke)) for a in world.actions)


def test_a_failed_smoke_test_rejects_the_version(bundle: ReleaseBundle,
                                                 root_path: Path) -> None:
    world = World(bundle, root_path=root_path,
                  smoke=m.SmokeDone(False, "smoke_output_mismatch", "outputs differ"))
    end = world.run()
    assert (end.outcome, end.reason) == ("rejected", "smoke_output_mismatch")
    assert world.disk.rejected == [2] and not world.disk.switched
    # ... and it is not installed again: the machine refuses it before downloading
    again = World(bundle, root_path=root_path, disk=Disk(rejected=[2]))
    assert again.run().reason == "previously_rejected"
    assert not any(isinstance(a, m.OpenDownload) for a in again.actions)


def test_a_smoke_test_the_device_cannot_run_fails_without_rejecting(
        bundle: ReleaseBundle, root_path: Path) -> None:
    world = World(bundle, root_path=root_path,
                  smoke=m.SmokeDone(False, "", "no runtime", available=False))
    end = world.run()
    assert (end.outcome, end.reason) == ("failed", m.SMOKE_UNAVAILABLE)
    assert world.disk.rejected == []


def test_errors_in_the_health_window_roll_back(bundle: ReleaseBundle, root_path: Path) -> None:
    world = World(bundle, root_path=root_path, serving_errors=2)
    end = world.run()
    assert (end.outcome, end.reason) == ("rolled_back", m.HEALTH_FAILED)
    assert "2 inference error(s)" in end.message
    assert not world.disk.switched and not world.disk.committed


def test_without_live_traffic_the_machine_exercises_the_model(bundle: ReleaseBundle,
                                                             root_path: Path) -> None:
    world = World(bundle, root_path=root_path)
    assert world.run().outcome == "installed"
    exercises = [a.n for a in world.actions if isinstance(a, m.Exercise)]
    assert exercises == list(range(SETTINGS.health_inferences))


def test_a_missing_manifest_times_out(bundle: ReleaseBundle, root_path: Path) -> None:
    world = World(bundle, root_path=root_path, envelope=b"")
    end = world.run()
    assert (end.outcome, end.reason) == ("failed", m.MANIFEST_TIMEOUT)
    assert world.now >= 1000.0 + SETTINGS.manifest_timeout_s


def test_an_unknown_variant_is_refused_and_a_known_one_installs(
        bundle: ReleaseBundle, root_path: Path, models_dir: Path, tmp_path: Path) -> None:
    end = World(bundle, root_path=root_path, variant="int4").run()
    assert (end.outcome, end.reason) == ("rejected", m.UNKNOWN_VARIANT)
    assert "default" in end.message
    world = World(bundle, root_path=root_path, variant="default")
    assert world.run().outcome == "installed"
    switch = next(a for a in world.actions if isinstance(a, m.Switch))
    assert switch.variant.name == "default"


def test_a_second_start_while_running_is_a_bug_the_machine_names(bundle: ReleaseBundle,
                                                                 root_path: Path) -> None:
    world = World(bundle, root_path=root_path)
    job = m.JobSpec(world.rid, CHUNK)
    state, _ = m.handle(m.Receiver("gw-1", SETTINGS), m.Start(job, world.trust(), 0.0))
    with pytest.raises(ValueError, match="already running"):
        m.handle(state, m.Start(job, world.trust(), 0.0))


def test_handle_never_changes_the_state_it_was_given(bundle: ReleaseBundle,
                                                     root_path: Path) -> None:
    world = World(bundle, root_path=root_path)
    job = m.JobSpec(world.rid, CHUNK)
    state, _ = m.handle(m.Receiver("gw-1", SETTINGS), m.Start(job, world.trust(), 0.0))
    state, actions = m.handle(state, m.ManifestMessage(world.envelope))
    manifest = next(a.manifest for a in actions if isinstance(a, m.CheckSpace))
    state, _ = m.handle(state, m.SpaceChecked(""))
    layout = ChunkLayout.from_manifest(manifest, CHUNK)
    state, _ = m.handle(state, m.DownloadOpened(ChunkBitmap(layout.counts), 0.0))
    before = state.download
    assert before is not None
    received = before.bitmap.received
    frame = encode_frame(0, 0, world.contents[0][:CHUNK])
    after, actions = m.handle(state, m.ChunkFrame(frame, 0.1))
    assert any(isinstance(a, m.WriteChunk) for a in actions)
    assert before.bitmap.received == received and state.download is before
    assert after.download is not None and after.download.bitmap.received == received + 1
    # the same frame again is a duplicate: counted, not written
    again, actions = m.handle(after, m.ChunkFrame(frame, 0.2))
    assert not any(isinstance(a, m.WriteChunk) for a in actions)
    assert again.download is not None and again.download.duplicates == 1


def _count_actions(bundle: ReleaseBundle, root_path: Path) -> int:
    world = World(bundle, root_path=root_path)
    world.run()
    return world.done


def test_a_kill_at_every_action_resumes_to_one_install(bundle: ReleaseBundle,
                                                       root_path: Path) -> None:
    """Kill the "agent" after each action in turn; restart from what is durable, as the agent's
    start-up does (a model on probation is rolled back and the install sent again)."""
    total = _count_actions(bundle, root_path)
    assert total > 20
    for kill_after in range(total):
        disk = Disk()
        first = World(bundle, root_path=root_path, disk=disk, kill_after=kill_after)
        with pytest.raises(KilledError):
            first.run()
        installed = 1
        if disk.committed:
            continue  # committed: nothing to resume, the new version serves
        if disk.switched:  # died on probation: start-up rolls back and forgets the job
            disk = replace(Disk(), rejected=disk.rejected)
        durable = set(disk.chunks)
        second = World(bundle, root_path=root_path, disk=disk, installed=installed)
        end = second.run()
        assert (end.outcome, end.reason) == ("installed", ""), (kill_after, end)
        # what was already on disk is neither asked for nor written again
        rewritten = {(a.chunk.file_index, a.chunk.index) for a in second.actions
                     if isinstance(a, m.WriteChunk)}
        assert not rewritten & durable, kill_after
        assert not set(second.requests) & durable, kill_after


@fuzz(300)
@given(payload=st.binary(max_size=2048))
def test_any_bytes_on_the_manifest_topic_end_the_job_cleanly(payload: bytes) -> None:
    state, _ = m.handle(m.Receiver("gw-1", SETTINGS),
                        m.Start(m.JobSpec("a" * 64, CHUNK), m.Trust(None, CLASS, __version__, 0),
                                0.0))
    state, actions = m.handle(state, m.ManifestMessage(payload))
    if payload:
        assert state.phase == m.IDLE
        (end,) = [a for a in actions if isinstance(a, m.End)]
        assert end.outcome == "rejected" and end.reason
    else:
        assert state.phase == m.MANIFEST and actions == []


@fuzz(300)
@given(frame=st.binary(max_size=CHUNK + 64))
def test_any_bytes_on_a_chunk_topic_are_refused_or_stored(frame: bytes) -> None:
    layout = ChunkLayout((5 * CHUNK + 17, 3), CHUNK)
    download = m.Download(layout=layout, bitmap=ChunkBitmap(layout.counts),
                          tracker=DownloadTracker(), pacer=ProgressPacer())
    state = m.Receiver("gw-1", SETTINGS, phase=m.DOWNLOADING,
                       job=m.JobSpec("a" * 64, CHUNK), download=download)
    after, actions = m.handle(state, m.ChunkFrame(frame, 0.0))
    writes = [a for a in actions if isinstance(a, m.WriteChunk)]
    assert after.download is not None
    refused = sum(after.download.refused.values())
    assert len(writes) + refused == 1
    for write in writes:
        assert write.chunk.offset + len(write.chunk.data) <= layout.lengths[write.chunk.file_index]


# -- deltas ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeltaRelease:
    bundle: ReleaseBundle
    base: bytes
    model: str  # the model file's name
    delta: str  # the delta file's name

    @property
    def bases(self) -> dict[str, bytes]:
        return {hashlib.sha256(self.base).hexdigest(): self.base}

    def index(self, name: str) -> int:
        return [f.name for f in self.bundle.manifest.files].index(name)


def delta_release(models_dir: Path, tmp_path: Path, *, delta_base: Optional[bytes] = None,
                  claimed_base: Optional[bytes] = None) -> DeltaRelease:
    """Release v2 of the seed model, a 10% fine-tune of it, with a delta from the seed (made
    from ``delta_base`` and naming ``claimed_base`` as its base, when given)."""
    from fleetlite.fleet.delta_builder import BaseRelease, plan_deltas
    from fleetlite.tools.finetune_weights import finetune_weights

    seed = (models_dir / "intent_classifier.tflite").read_bytes()
    tuned = tmp_path / "intent_classifier.tflite"
    tuned.write_bytes(finetune_weights(seed, seed=14))
    made_from = delta_base if delta_base is not None else seed
    (built,), skipped = plan_deltas(BaseRelease("v1", {tuned.name: made_from}),
                                    [(tuned.name, tuned.read_bytes())], max_ratio=10.0)
    assert skipped == []
    if claimed_base is not None:
        built = replace(built, base_sha256=hashlib.sha256(claimed_base).hexdigest())
    bundle = release(models_dir, tmp_path, 2, model=tuned, deltas=[built])
    return DeltaRelease(bundle, seed, tuned.name, built.delta_name)


def _delivered_files(world: World, rel: DeltaRelease) -> set[str]:
    names = [f.name for f in rel.bundle.manifest.files]
    return {names[a.chunk.file_index] for a in world.actions if isinstance(a, m.WriteChunk)}


def test_a_delta_travels_instead_of_the_full_model(models_dir: Path, tmp_path: Path,
                                                   root_path: Path) -> None:
    rel = delta_release(models_dir, tmp_path)
    full = World(rel.bundle, root_path=root_path)  # a device without the base
    assert full.run().outcome == "installed"
    assert rel.delta not in _delivered_files(full, rel)
    assert not any(isinstance(a, m.Rebuild) for a in full.actions)
    world = World(rel.bundle, root_path=root_path, bases=rel.bases)
    end = world.run()
    assert (end.outcome, end.reason) == ("installed", ""), end.message
    delivered = _delivered_files(world, rel)
    assert rel.delta in delivered and rel.model not in delivered
    (rebuild,) = [a for a in world.actions if isinstance(a, m.Rebuild)]
    assert rebuild.delta.file == rel.model
    # the chunk subscriptions name only the fetched files, so the broker never sends the
    # full model: the bytes delivered are what the delta saves
    model_len = rel.bundle.manifest.file(rel.model).length
    delta_len = rel.bundle.manifest.file(rel.delta).length
    assert full.delivered_bytes - world.delivered_bytes == model_len - delta_len
    assert delta_len <= 0.15 * model_len
    # the slot gets the rebuilt model, never the delta
    switch = next(a for a in world.actions if isinstance(a, m.Switch))
    assert rel.model in switch.files and rel.delta not in switch.files
    assert world.staged[rel.model] == rel.bundle.files[rel.model]
    assert world.notices == []


@pytest.mark.parametrize("how", ["corrupted in transit", "made from another base"])
def test_a_bad_delta_is_refused_and_the_full_model_fetched(
        models_dir: Path, tmp_path: Path, root_path: Path, how: str) -> None:
    if how == "corrupted in transit":
        rel = delta_release(models_dir, tmp_path)
        files = [bytes(b ^ 0x55 for b in rel.bundle.files[f.name][:64])
                 + rel.bundle.files[f.name][64:] if f.name == rel.delta
                 else rel.bundle.files[f.name] for f in rel.bundle.manifest.files]
        reason = "hash_mismatch"
    else:  # signed as a delta from the seed, but computed from other bytes
        other = (models_dir / "sensor_autoencoder.tflite").read_bytes()
        seed = (models_dir / "intent_classifier.tflite").read_bytes()
        rel = delta_release(models_dir, tmp_path, delta_base=other, claimed_base=seed)
        files = None
        reason = "delta_base_mismatch"
    world = World(rel.bundle, root_path=root_path, bases=rel.bases, files=files)
    end = world.run()
    assert (end.outcome, end.reason) == ("installed", ""), end.message
    (notice,) = world.notices
    assert (notice.kind, notice.reason) == ("ota_delta_refused", reason)
    assert "fetching the full files" in notice.message
    assert rel.model in _delivered_files(world, rel)
    assert world.staged[rel.model] == rel.bundle.files[rel.model]


def test_a_kill_at_every_action_of_a_delta_install_resumes_to_one_install(
        models_dir: Path, tmp_path: Path, root_path: Path) -> None:
    rel = delta_release(models_dir, tmp_path)
    counting = World(rel.bundle, root_path=root_path, bases=rel.bases)
    counting.run()
    for kill_after in range(counting.done):
        disk = Disk()
        with pytest.raises(KilledError):
            World(rel.bundle, root_path=root_path, bases=rel.bases, disk=disk,
                  kill_after=kill_after).run()
        if disk.committed:
            continue
        if disk.switched:
            disk = Disk()
        again = World(rel.bundle, root_path=root_path, bases=rel.bases, disk=disk)
        end = again.run()
        assert (end.outcome, end.reason) == ("installed", ""), (kill_after, end)
        assert again.staged[rel.model] == rel.bundle.files[rel.model]
        assert rel.model not in _delivered_files(again, rel), kill_after


def test_a_probe_reports_each_variant_and_never_switches_or_rejects(
        bundle: ReleaseBundle, root_path: Path) -> None:
    failing = m.SmokeDone(False, "over_latency_budget", "too slow",
                          figures={"p95_ms": 900.0, "fidelity": 1.0})
    world = World(bundle, root_path=root_path, smoke=failing, probe=True)
    world.run()
    (end,) = world.ends
    assert (end.outcome, end.reason) == ("probed", "")
    assert end.progress == {"variants": {"default": {
        "p95_ms": 900.0, "fidelity": 1.0, "passed": False, "reason": "over_latency_budget"}}}
    assert not any(isinstance(a, (m.Switch, m.Reject, m.Commit)) for a in world.actions)
