"""The profiles a rollout step reads (fleet/rollout_inputs.py), kept in step with a real store
(SQLite, and PostgreSQL when FLEETLITE_TEST_PG_URL is set): each record is parsed once, new ones
are read, pruned ones are forgotten, and the views equal what a full read gives."""

from __future__ import annotations

from fleetlite.fleet.gates import ProfileView
from fleetlite.fleet.rollout_inputs import OutcomeViews, ProfileViews
from fleetlite.fleet.store import Store, open_store
from tests.test_store import RELEASE, SHA_A, SHA_B, ota, profile


def full_read(store: Store, model: str) -> list[ProfileView]:
    return [ProfileView.from_record(row.record(), row.device_class)
            for row in store.profiles(model=model)]


def test_views_follow_the_store_and_parse_each_profile_once(store_url: str) -> None:
    with open_store(store_url) as store:
        views = ProfileViews()
        assert views.views(store, "kws", {}) == []
        for n in range(3):
            store.add_profile(profile(f"gw-{n}", ts=1_700_000_000.0 + n), device_class="rpi4")
        first = views.views(store, "kws", {})
        assert first == full_read(store, "kws") and len(first) == 3 and views.parsed == 3
        assert views.views(store, "kws", {}) == first and views.parsed == 3  # nothing new
        # a new version's profiles come in; only they are parsed
        store.add_profile(profile("gw-0", ts=1_700_000_100.0, sha256=SHA_B, version=4,
                                  p95=0.5), device_class="rpi4")
        second = views.views(store, "kws", {})
        assert second == full_read(store, "kws") and views.parsed == 4
        assert [v.version for v in second] == [3, 3, 3, 4]
        # the store prunes gw-0's oldest profile: the views forget it
        store.add_profile(profile("gw-0", ts=1_700_000_200.0, sha256=SHA_A, version=3),
                          device_class="rpi4", keep_per_device=1)
        third = views.views(store, "kws", {})
        assert third == full_read(store, "kws")
        assert [v.ts for v in third if v.device_id == "gw-0"] == [1_700_000_200.0]
        # a profile stored without a class takes the device's class from the registry
        store.add_profile(profile("gw-9", ts=1_700_000_300.0, device_facts={}), device_class="")
        assert [v.device_class for v in views.views(store, "kws", {"gw-9": "jetson"})
                if v.device_id == "gw-9"] == ["jetson"]
        assert views.views(store, "other", {}) == []


def test_outcomes_are_the_final_statuses_on_the_controller_clock(store_url: str) -> None:
    with open_store(store_url) as store:
        outcomes = OutcomeViews()
        assert outcomes.views(store, RELEASE) == []
        store.add_ota_status(ota("gw-1", RELEASE, 10.0, "downloading"), received_at=100.0)
        store.add_ota_status(ota("gw-1", RELEASE, 11.0, "done", final=True, outcome="failed",
                                 reason="disk_full"), received_at=101.0)
        store.add_ota_status(ota("gw-2", RELEASE, 12.0, "done", final=True,
                                 outcome="installed"), received_at=99.0)
        store.add_ota_status(ota("gw-3", "s" * 64, 12.0, "done", final=True,
                                 outcome="installed"), received_at=99.0)
        first = outcomes.views(store, RELEASE)
        assert [(o.device_id, o.outcome, o.reason, o.ts) for o in first] == [
            ("gw-2", "installed", "", 99.0), ("gw-1", "failed", "disk_full", 101.0)]
        assert outcomes.parsed == 2
        store.add_ota_status(ota("gw-1", RELEASE, 20.0, "done", final=True,
                                 outcome="installed"), received_at=120.0)
        assert [o.outcome for o in outcomes.views(store, RELEASE)] == [
            "installed", "failed", "installed"]
        assert outcomes.parsed == 3
        assert store.ota_last_heard(RELEASE) == {"gw-1": 120.0, "gw-2": 99.0}
        # what a step reads first (one index lookup), then only of the devices still silent
        assert store.ota_heard_latest(RELEASE) == 120.0
        assert store.ota_heard_latest("0" * 64) is None
        assert store.ota_last_heard(RELEASE, ["gw-2", "gw-3", "gw-9"]) == {"gw-2": 99.0}
        assert store.ota_last_heard(RELEASE, []) == {}
