"""Paging on a large fleet (issue 13): ``Store.list_devices(limit=, after=)``, ``Fleet.devices``
and ``fleetlite devices list --limit/--continue`` as an operator runs it (the console script as a
subprocess, on a real SQLite store and on PostgreSQL when FLEETLITE_TEST_PG_URL is set), and the
HTML report's capped devices table (``--max-devices``): attention first, the rest by id, what it
left out said."""

from __future__ import annotations

import html
import json
import re
import shlex
import time
import urllib.parse
from collections import Counter
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleetlite.fleet import Fleet
from fleetlite.fleet.cli_fleet import TABLE_PAGE, continue_token
from fleetlite.fleet.report import DeviceSummary, ReportData, render_report
from fleetlite.fleet.rollout import (
    FAILED,
    INSTALLED,
    REJECTED,
    ROLLED_BACK,
    DeviceProgress,
    RolloutSpec,
    RolloutState,
    Selector,
    parse_waves,
)
from fleetlite.fleet.store import Store, open_store
from tests.test_fleet_cli import FLEETLITE, cli
from tests.test_report import Node, parse
from tests.test_store import birth, status

RELEASE = "b" * 64


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    with open_store(store_url) as opened:
        yield opened


def add_devices(store: Store, ids: list[str], *, offline: Collection[str] = (),
                now: float | None = None) -> None:
    """Devices as the controller stores them: a birth (class jetson for ids ending in an odd
    digit, else rpi4; a site tag) and an online or offline status."""
    ts = time.time() if now is None else now
    with store.batch():
        for device_id in ids:
            odd = device_id[-1] in "13579"
            store.upsert_birth(birth(device_id, 1, ts, device_class="jetson" if odd else "rpi4",
                                     tags={"site": "lab" if odd else "plant"}), received_at=ts)
            store.upsert_status(status(device_id, device_id not in offline, 1, ts),
                                received_at=ts)


# -- the store and the SDK -------------------------------------------------------------------------


def test_pages_walk_every_device_once_while_devices_are_added(store: Store) -> None:
    first = [f"gw-{n:03d}" for n in range(0, 60, 2)]  # gw-000, gw-002 ... gw-058
    add_devices(store, first)
    seen: list[str] = []
    added_ahead: list[str] = []
    after = None
    while True:
        page = store.list_devices(limit=7, after=after)
        assert [d.device_id for d in page] == sorted(d.device_id for d in page)
        seen += [d.device_id for d in page]
        if len(page) < 7:
            break
        after = page[-1].device_id
        # between pages: one device behind the cursor (not listed: its page is gone), one ahead
        n = int(after[3:])
        behind, ahead = f"gw-{n - 1:03d}", f"gw-{n + 3:03d}"
        add_devices(store, [behind, ahead])
        added_ahead.append(ahead)
    counts = Counter(seen)
    assert [d for d, c in counts.items() if c > 1] == []  # nothing twice
    assert set(first) <= set(seen)  # every device there from the start, once
    assert set(added_ahead) <= set(seen)  # and those registered ahead of the cursor
    assert seen == sorted(seen)
    # a page carries its devices' own tags and models, not a neighbour's
    whole = {d.device_id: d for d in store.list_devices()}
    for device in store.list_devices(limit=3, after="gw-010"):
        assert (device.tags, device.models) == (whole[device.device_id].tags,
                                                whole[device.device_id].models)
    assert store.list_devices(limit=0) == store.list_devices()
    assert store.list_devices(after="gw-999") == []
    with pytest.raises(ValueError):
        store.list_devices(limit=-1)


def test_limit_with_filters(store: Store, store_url: str) -> None:
    ids = [f"gw-{n:03d}" for n in range(20)]
    add_devices(store, ids, offline={"gw-003", "gw-007", "gw-008"})
    fleet = Fleet(store_url, "localhost:1883")
    try:
        jetson = [f"gw-{n:03d}" for n in range(1, 20, 2)]
        pages = [fleet.devices(device_class="jetson", limit=4)]
        while len(pages[-1]) == 4:
            pages.append(fleet.devices(device_class="jetson", limit=4,
                                       after=pages[-1][-1].device_id))
        assert [[d.device_id for d in p] for p in pages] == [jetson[:4], jetson[4:8],
                                                             jetson[8:]]
        offline = fleet.devices(online=False, tags={"site": "lab"}, limit=1, after="gw-003")
        assert [d.device_id for d in offline] == ["gw-007"]
    finally:
        fleet.close()


# -- fleetlite devices list ------------------------------------------------------------------------


def _follow(hint: str, url: str) -> list[str]:
    """The command a page's last line (stderr) gives for the next page, as argv to run."""
    line = hint.strip().splitlines()[-1]
    assert "the next page: fleetlite devices list" in line, line
    command = line.split("the next page: ", 1)[1].split("  (--limit 0", 1)[0]
    with_db = command.endswith(" (with your --db)")  # a URL with a password is not echoed
    argv = shlex.split(command.removesuffix(" (with your --db)"))
    assert argv[:3] == ["fleetlite", "devices", "list"]
    if with_db:
        assert urllib.parse.urlsplit(url).password and "--db" not in argv
        argv += ["--db", url]
    else:
        assert argv[-2:] == ["--db", url]
    return argv[1:]


def _rows(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    assert lines[0].split()[:3] == ["DEVICE", "CLASS", "STATUS"]
    return [line.split()[0] for line in lines[1:]]


def test_table_pages_with_the_command_it_prints(store: Store, store_url: str) -> None:
    add_devices(store, [f"gw-{n:03d}" for n in range(0, 40, 2)])
    argv = ["devices", "list", "--limit", "6", "--db", store_url]
    seen: list[str] = []
    pages = 0
    while True:
        proc = cli(*argv)
        rows = _rows(proc.stdout)  # stdout holds the header and the rows only
        assert len(rows) <= 6
        seen += rows
        pages += 1
        if "more follow" not in proc.stderr:
            assert proc.stderr == ""
            break
        assert len(rows) == 6
        password = urllib.parse.urlsplit(store_url).password
        assert not password or f":{password}@" not in proc.stderr
        argv = _follow(proc.stderr, store_url)
        assert argv[argv.index("--limit") + 1] == "6"
        n = int(rows[-1][3:])
        add_devices(store, [f"gw-{n + 1:03d}", f"gw-{n - 1:03d}"])  # ahead, behind
    assert pages >= 4
    assert len(seen) == len(set(seen))
    assert set(f"gw-{n:03d}" for n in range(0, 40, 2)) <= set(seen)
    assert seen == sorted(seen)


def test_json_and_yaml_carry_the_continue_token(store: Store, store_url: str) -> None:
    ids = [f"gw-{n:03d}" for n in range(11)]
    add_devices(store, ids)
    seen: list[str] = []
    token: Any = None
    while True:
        extra = ["--continue", token] if token else []
        doc = json.loads(cli("devices", "list", "--limit", "4", "-o", "json", *extra,
                             "--db", store_url).stdout)
        assert set(doc) == {"devices", "continue"}
        seen += [d["device_id"] for d in doc["devices"]]
        token = doc["continue"]
        if token is None:
            break
        assert token == continue_token(doc["devices"][-1]["device_id"])
        assert doc["devices"][-1]["device_id"] not in token  # opaque
    assert seen == ids
    # a last page that is exactly full says so: no empty page after it
    last = yaml.safe_load(cli("devices", "list", "--limit", "3", "-o", "yaml", "--continue",
                              continue_token("gw-007"), "--db", store_url).stdout)
    assert [d["device_id"] for d in last["devices"]] == ["gw-008", "gw-009", "gw-010"]
    assert last["continue"] is None
    # json and yaml list every device unless --limit is given (scripts keep working)
    whole = json.loads(cli("devices", "list", "-o", "json", "--db", store_url).stdout)
    assert [d["device_id"] for d in whole["devices"]] == ids and whole["continue"] is None


def test_filters_page_and_the_hint_keeps_them(store: Store, store_url: str) -> None:
    add_devices(store, [f"gw-{n:03d}" for n in range(20)], offline={"gw-005", "gw-013"})
    proc = cli("devices", "list", "--class", "jetson", "--tag", "site=lab", "--online",
               "--limit", "3", "--db", store_url)
    assert _rows(proc.stdout) == ["gw-001", "gw-003", "gw-007"]
    argv = _follow(proc.stderr, store_url)
    assert argv[2:9] == ["--class", "jetson", "--tag", "site=lab", "--online", "--limit", "3"]
    proc = cli(*argv)
    assert _rows(proc.stdout) == ["gw-009", "gw-011", "gw-015"]
    proc = cli(*_follow(proc.stderr, store_url))
    assert _rows(proc.stdout) == ["gw-017", "gw-019"] and proc.stderr == ""


def test_the_table_stops_at_its_default_page_on_a_large_fleet(store: Store,
                                                              store_url: str) -> None:
    ids = [f"sim-{n:05d}" for n in range(TABLE_PAGE + 3)]
    add_devices(store, ids)
    proc = cli("devices", "list", "--db", store_url)
    assert _rows(proc.stdout) == ids[:TABLE_PAGE]
    assert f"{TABLE_PAGE} devices shown, more follow" in proc.stderr
    assert "--limit 0: every device" in proc.stderr
    argv = _follow(proc.stderr, store_url)
    assert "--limit" not in argv  # the next page of the same default size
    assert _rows(cli(*argv).stdout) == ids[TABLE_PAGE:]
    everything = cli("devices", "list", "--limit", "0", "--db", store_url)
    assert _rows(everything.stdout) == ids and everything.stderr == ""
    doc = json.loads(cli("devices", "list", "-o", "json", "--db", store_url).stdout)
    assert len(doc["devices"]) == len(ids) and doc["continue"] is None


@pytest.mark.parametrize("token", [
    "garbage!",  # not base64url
    "Zm9v",  # base64 of "foo": no page gave it
    continue_token("gw-1")[:-3] + "A",  # a token cut and mangled
    "",
])
def test_a_bad_token_is_a_usage_error(tmp_path: Path, token: str) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    with open_store(url) as store:
        add_devices(store, ["gw-1", "gw-2"])
    proc = cli("devices", "list", "--continue", token, "--db", url, expect=2)
    assert "argument --continue" in proc.stderr
    assert "is not a token a page of `fleetlite devices list` gave" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    bad_limit = cli("devices", "list", "--limit", "-5", "--db", url, expect=2)
    assert "argument --limit" in bad_limit.stderr


def test_a_device_gone_since_the_token_still_pages(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    with open_store(url) as store:
        add_devices(store, ["gw-1", "gw-3"])
    # a token whose device is not (or no longer) in the store: the page after its id
    doc = json.loads(cli("devices", "list", "-o", "json", "--continue", continue_token("gw-2"),
                         "--db", url).stdout)
    assert [d["device_id"] for d in doc["devices"]] == ["gw-3"]


def test_help_says_the_defaults_and_why() -> None:
    text = cli("devices", "list", "--help").stdout
    assert "--limit N" in text and "--continue TOKEN" in text
    assert f"the table shows {TABLE_PAGE}" in " ".join(text.split())
    assert "scripts written before paging still get the whole fleet" in " ".join(text.split())
    assert "fleetlite devices list --limit 100 --continue TOKEN -o json" in text
    assert "exit codes" in text
    report = " ".join(cli("report", "--help").stdout.split())
    assert "--max-devices N" in report and "default 1000" in report
    assert FLEETLITE.endswith("fleetlite")


# -- the report ------------------------------------------------------------------------------------


def add_rollout(store: Store, statuses: dict[str, str]) -> None:
    """A completed rollout of kws v2 to these devices, with these per-device outcomes."""
    now = time.time()
    manifest = {"name": "kws", "version": 2, "files": [],
                "targets": {"device_classes": ["rpi4", "jetson"]}}
    store.add_release(RELEASE, "kws", 2, b"{}", {}, manifest)
    spec = RolloutSpec(rollout_id="ro-1", release_id=RELEASE, model="kws", version=2,
                       previous_version=1, selector=Selector(), waves=parse_waves("100%"),
                       wave_timeout_s=600, chunk_size=16384)
    progress = {d: DeviceProgress(d, "rpi4", 1, status=s, sent_at=now, updated_at=now)
                for d, s in statuses.items()}
    state = RolloutState(state="completed", current_wave=1, devices=progress, reason="done")
    store.create_rollout("ro-1", RELEASE, spec.to_dict(), state=state.to_dict())


def _left_out(page: str) -> str:
    """The text of the report's "left out" line."""
    found = re.search(r'<p class="note" id="devices-left-out">(.*?)</p>', page)
    assert found, "the report says nothing left out"
    return html.unescape(re.sub(r"<[^>]+>", "", found.group(1)))


def _device_rows(page: str) -> list[Node]:
    table = parse(page).find_all("table", id="devices-table")[0]
    return table.find_all("tr")[1:]


def test_report_lists_attention_first_and_says_what_it_left_out(
        store: Store, store_url: str, tmp_path: Path) -> None:
    ids = [f"gw-{n:03d}" for n in range(30)]
    add_devices(store, ids, offline={"gw-021", "gw-004"})
    add_rollout(store, {**{d: INSTALLED for d in ids}, "gw-017": FAILED, "gw-002": REJECTED,
                        "gw-025": ROLLED_BACK})
    out = tmp_path / "fleet.html"
    proc = cli("report", "--html", str(out), "--max-devices", "8", "--db", store_url)
    assert "30 device(s) (8 in its table" in proc.stdout
    page = out.read_text()
    rows = _device_rows(page)
    listed = [r.attrs["data-device-id"] for r in rows]
    attention = ["gw-002", "gw-004", "gw-017", "gw-021", "gw-025"]
    assert listed == [*attention, "gw-000", "gw-001", "gw-003"]
    assert [r.attrs.get("data-attention") for r in rows] == ["1"] * 5 + [None] * 3
    reasons = {r.attrs["data-device-id"]: r.find_all("td")[7].text() for r in rows}
    assert reasons["gw-002"] == "install rejected" and reasons["gw-017"] == "install failed"
    assert reasons["gw-004"] == "offline" and reasons["gw-025"] == "rolled back"
    assert reasons["gw-000"] == ""
    root = parse(page)
    note = _left_out(page)
    assert "Showing 8 of 30 devices" in note and "22 left out" in note
    assert "the 5 needing attention" in note
    # the command it names lists them all (a password stays out of the page)
    command = note.split("list them all with ", 1)[1].rstrip(".")
    if urllib.parse.urlsplit(store_url).password:
        assert command == "fleetlite devices list --limit 0"
        assert f":{urllib.parse.urlsplit(store_url).password}@" not in page
    else:
        assert command == f"fleetlite devices list --limit 0 --db {store_url}"
        listed_all = _rows(cli(*shlex.split(command)[1:]).stdout)
        assert listed_all == ids
    # counts and aggregates are over the whole fleet
    assert root.find_all("div", id="fleet-size")[0].text() == "30"
    assert root.find_all("div", id="online-count")[0].text() == "28"
    assert root.find_all("div", id="attention-count")[0].text() == "5"
    classes = {s.attrs["data-device-class"]: s.find_all("h3")[0].text()
               for s in root.find_all("section", class_="device-class")}
    assert "15 devices" in classes["jetson"] and "15 devices" in classes["rpi4"]
    # --max-devices 0: every device, no "left out"
    doc = json.loads(cli("report", "--html", str(out), "--max-devices", "0", "-o", "json",
                         "--db", store_url).stdout)
    assert (doc["devices"], doc["devices_listed"], doc["devices_needing_attention"]) == (
        30, 30, 5)
    rows = _device_rows(out.read_text())
    assert [r.attrs["data-device-id"] for r in rows] == attention + sorted(
        set(ids) - set(attention))
    assert 'id="devices-left-out"' not in out.read_text()


def test_report_default_cap_and_stale_devices() -> None:
    now = 1_800_000_000.0
    devices = [DeviceSummary(f"d-{n:04d}", "rpi4", online=True, last_seen=now - 5)
               for n in range(1203)]
    devices[700] = DeviceSummary("d-0700", "rpi4", online=True, last_seen=now - 601)
    devices[9] = DeviceSummary("d-0009", "rpi4", online=True, last_seen=None)  # never heard
    page = render_report(ReportData(generated_at=now, devices=devices))
    rows = _device_rows(page)
    assert len(rows) == 1000
    assert rows[0].attrs["data-device-id"] == "d-0700"
    assert rows[0].find_all("td")[7].text() == "stale"
    assert [r.attrs["data-device-id"] for r in rows[1:4]] == ["d-0000", "d-0001", "d-0002"]
    note = _left_out(page)
    assert "Showing 1,000 of 1,203 devices" in note and "203 left out" in note
    assert "not heard from for over 10 min" in note
    assert "fleetlite devices list --limit 0" in note
    small = render_report(ReportData(generated_at=now, devices=devices[:5], max_devices=None))
    assert len(_device_rows(small)) == 5 and "left out" not in small
