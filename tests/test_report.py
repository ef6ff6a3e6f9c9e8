"""The fleet HTML report and profile views: structure, numbers, escaping, self-containment, and a
real render in headless Chromium (screenshot pixels and the page's own script)."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import struct
import subprocess
import tempfile
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Optional

import pytest
import yaml

from fleetlite.fleet import profiles_view as pv
from fleetlite.fleet.errors import FleetError
from fleetlite.fleet.report import (
    PALETTE,
    STATUS_COLORS,
    ClassBudget,
    DecisionEntry,
    DeviceSummary,
    ReportData,
    RolloutSummary,
    WaveSummary,
    format_number,
    render_report,
    write_report,
)

REPO = Path(__file__).resolve().parent.parent
HOSTILE_ID = "<script>alert(1)</script>"
GATE_REASON = ("latency gate tripped on raspberry-pi-4: p95 0.41 ms vs baseline 0.20 ms "
               "(+105%, limit +20%)")
NOW = 1_746_100_000.0
MODEL = "kws-tiny"
WINDOW = (1280, 3000)  # tall enough for the whole sample page

# device id, class, online, active version, p95 per version (ms), peak RSS (MiB) per version
_FLEET: list[tuple[str, str, bool, int, dict[int, float], dict[int, float]]] = [
    ("rpi4-berlin-01", "raspberry-pi-4", True, 1, {1: 0.20, 2: 0.41}, {1: 61.0, 2: 64.5}),
    (HOSTILE_ID, "raspberry-pi-4", True, 1, {1: 0.21, 2: 0.40}, {1: 60.2, 2: 63.8}),
    ("rpi4-hamburg-03", "raspberry-pi-4", False, 1, {1: 0.19}, {1: 59.7}),
    ("rpi4-munich-07", "raspberry-pi-4", True, 1, {1: 0.22}, {1: 62.4}),
    ("jetson-lab-1", "jetson-orin-nano", True, 2, {1: 0.090, 2: 0.095}, {1: 88.0, 2: 90.5}),
    ("jetson-lab-2", "jetson-orin-nano", True, 2, {1: 0.085, 2: 0.088}, {1: 87.1, 2: 89.9}),
    ("x86-plant-a", "industrial-x86-gateway", True, 2, {1: 0.050, 2: 0.048}, {1: 41.0, 2: 42.2}),
    ("x86-plant-b", "industrial-x86-gateway", True, 2, {1: 0.055, 2: 0.052}, {1: 40.6, 2: 41.9}),
    # a throttled box: its spread makes the class's latency axis logarithmic
    ("x86-plant-c", "industrial-x86-gateway", False, 2, {1: 0.60, 2: 0.58}, {1: 44.3, 2: 45.0}),
]
CLASSES = ("industrial-x86-gateway", "jetson-orin-nano", "raspberry-pi-4")


def build_profiles() -> list[pv.ProfileRow]:
    rows: list[pv.ProfileRow] = []
    for i, (dev, cls, _online, _active, p95s, rss) in enumerate(_FLEET):
        for version, p95 in p95s.items():
            ts = NOW - 3600 * (3 - version) - i
            rows.append(pv.ProfileRow(
                device_id=dev, device_class=cls, model=MODEL, version=version,
                p50_ms=round(p95 * 0.7, 4), p95_ms=p95, p99_ms=round(p95 * 1.3, 4),
                mean_ms=round(p95 * 0.75, 4), peak_rss_mb=rss[version], ts=ts,
                trigger="install" if version == 2 else "model_change",
            ))
    # an older, slower v1 profile of rpi4-berlin-01: superseded by the newer one above
    rows.append(pv.ProfileRow("rpi4-berlin-01", "raspberry-pi-4", MODEL, 1, 0.9, 3.0, 4.0, 1.0,
                              99.0, NOW - 86400, "schedule"))
    return rows


def build_data() -> ReportData:
    devices = [
        DeviceSummary(
            device_id=dev, device_class=cls, online=online, model=MODEL, version=active,
            last_seen=NOW - (30 if online else 7200) - i,
            tags={"site": dev.split("-")[1] if "-" in dev else "lab<b>", "ring": "prod"},
            agent_version="0.4.0",
        )
        for i, (dev, cls, online, active, _p95, _rss) in enumerate(_FLEET)
    ]
    waves = [
        WaveSummary("wave 1 · canary", installed=3, state="completed",
                    device_classes=("industrial-x86-gateway",)),
        WaveSummary("wave 2 · early", installed=2, rolled_back=2, failed=0, state="rolled back",
                    device_classes=("jetson-orin-nano", "raspberry-pi-4")),
        WaveSummary("wave 3 · rest", pending=2, state="waiting",
                    device_classes=("raspberry-pi-4",)),
    ]
    decisions = [
        DecisionEntry(NOW - 9000, "start", "wave 1 · canary started: 3 devices", "wave 1 · canary"),
        DecisionEntry(NOW - 7000, "proceed", "3/3 installed; p95 within +20% of baseline on "
                      "industrial-x86-gateway", "wave 1 · canary", "industrial-x86-gateway"),
        DecisionEntry(NOW - 6900, "start", "wave 2 · early started: 4 devices", "wave 2 · early"),
        DecisionEntry(NOW - 3700, "rollback", GATE_REASON, "wave 2 · early", "raspberry-pi-4"),
        DecisionEntry(NOW - 3650, "pause", "rollout paused after a tripped gate; <operator> must "
                      "resume or abort", "wave 2 · early"),
    ]
    rollout = RolloutSummary(
        rollout_id="ro-0042", model=MODEL, version=2, from_version=1, state="paused",
        waves=waves, decisions=decisions, created_at=NOW - 9100,
        gates=("p95 latency +20%", "peak RSS +15%", "output agreement >= 0.98"),
    )
    return ReportData(
        generated_at=NOW, devices=devices, profiles=build_profiles(), rollouts=[rollout],
        budgets={"raspberry-pi-4": ClassBudget(max_p95_ms=0.5, max_peak_rss_mb=256.0),
                 "jetson-orin-nano": ClassBudget(max_p95_ms=40.0, max_peak_rss_mb=1024.0)},
    )


# -- a tiny DOM for structural assertions -------------------------------------------------------

_VOID = {"meta", "input", "br", "img", "link", "hr", "col", "source", "wbr"}


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)

    def iter(self) -> Iterator[Node]:
        yield self
        for c in self.children:
            yield from c.iter()

    def find_all(self, tag: str, **attrs: str) -> list[Node]:
        want = {k.rstrip("_").replace("_", "-"): v for k, v in attrs.items()}
        out = []
        for n in self.iter():
            if n.tag != tag:
                continue
            ok = True
            for k, v in want.items():
                if k == "class":
                    ok = ok and v in n.attrs.get("class", "").split()
                else:
                    ok = ok and n.attrs.get(k) == v
            if ok:
                out.append(n)
        return out

    def text(self) -> str:
        return "".join(self.text_parts) + "".join(c.text() for c in self.children)


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, Optional[str]]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in _VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, Optional[str]]]) -> None:
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID:
            return
        assert self.stack[-1].tag == tag, f"unbalanced </{tag}> in <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.stack[-1].text_parts.append(data)


def parse(doc: str) -> Node:
    builder = _TreeBuilder()
    builder.feed(doc)
    builder.close()
    assert builder.stack == [builder.root], "unclosed elements"
    return builder.root


@pytest.fixture(scope="module")
def report_html() -> str:
    return render_report(build_data())


# -- profiles_view ------------------------------------------------------------------------------


def test_aggregate_counts_each_device_once_and_takes_medians() -> None:
    aggs = pv.aggregate(build_profiles())
    keys = [(a.device_class, a.version) for a in aggs]
    assert keys == [(c, v) for c in CLASSES for v in (1, 2)]
    rpi_v1 = next(a for a in aggs if a.device_class == "raspberry-pi-4" and a.version == 1)
    assert rpi_v1.count == 4  # the superseded berlin profile does not count
    assert rpi_v1.p95_ms_median == pytest.approx(statistics.median([0.20, 0.21, 0.19, 0.22]))
    assert rpi_v1.p95_ms_max == 0.22
    assert rpi_v1.peak_rss_mb_max == 62.4
    everything = pv.aggregate(build_profiles(), latest_only=False)
    assert next(a for a in everything if a.device_class == "raspberry-pi-4"
                and a.version == 1).count == 5
    # mappings work as rows
    as_dicts = [r.to_dict() for r in build_profiles()]
    assert pv.aggregate(as_dicts) == aggs
    with pytest.raises(ValueError, match="p95_ms"):
        pv.to_rows([{k: v for k, v in as_dicts[0].items() if k != "p95_ms"}])


def test_compare_ratios_and_renderings() -> None:
    cmp = pv.compare(build_profiles(), MODEL, 1, 2)
    assert [r.device_class for r in cmp.rows] == list(CLASSES)
    rpi = cmp.rows[2]
    assert rpi.a is not None and rpi.b is not None
    assert rpi.b.count == 2
    assert rpi.p95_ratio == pytest.approx(statistics.median([0.41, 0.40]) / 0.205)
    table = pv.render(cmp, "table")
    lines = table.splitlines()
    assert lines[0] == "kws-tiny: v2 (B) against v1 (A)"
    assert all(not line.endswith(" ") for line in lines)
    header, *body = lines[1:]
    assert len(body) == 3 and body[2].startswith("raspberry-pi-4")
    # aligned: every row as wide as the header's right edge for right-aligned columns
    assert {len(line) for line in body} == {len(header)}
    assert "x1.98 (+98%)" in body[2]
    doc = json.loads(pv.render(cmp, "json"))
    assert doc["device_classes"][2]["ratios"]["p95_ms_median"] == pytest.approx(rpi.p95_ratio)
    assert yaml.safe_load(pv.render(cmp, "yaml")) == doc
    aggs = pv.aggregate(build_profiles())
    agg_table = pv.render(aggs, "table").splitlines()
    assert agg_table[0].split()[:3] == ["DEVICE", "CLASS", "MODEL"]
    assert len(agg_table) == 7
    assert yaml.safe_load(pv.render(aggs, "yaml")) == json.loads(pv.render(aggs, "json"))
    with pytest.raises(ValueError, match="output must be"):
        pv.render(aggs, "xml")
    # a version missing on a class leaves that side empty
    only_v1 = [r for r in build_profiles() if not (r.device_class == "raspberry-pi-4"
                                                   and r.version == 2)]
    row = pv.compare(only_v1, MODEL, 1, 2).rows[2]
    assert row.b is None and row.p95_ratio is None
    assert "-" in pv.comparison_table(pv.compare(only_v1, MODEL, 1, 2)).splitlines()[-1]


# -- the HTML -----------------------------------------------------------------------------------


def test_report_structure_and_numbers(report_html: str) -> None:
    root = parse(report_html)
    body = root.find_all("body")[0]
    assert body.attrs["data-rendered"] == "no"  # the script flips it
    assert root.find_all("div", id="fleet-size")[0].text() == "9"
    assert root.find_all("div", id="online-count")[0].text() == "7"
    assert root.find_all("time", id="generated-at")[0].text() == "2025-05-01 11:46:40 UTC"

    # devices table: one row per device, cells from the inputs
    rows = root.find_all("table", id="devices-table")[0].find_all("tr")[1:]
    assert len(rows) == 9
    by_id = {r.attrs["data-device-id"]: [td.text() for td in r.find_all("td")] for r in rows}
    assert set(by_id) == {d[0] for d in _FLEET}
    cells = by_id["jetson-lab-2"]
    assert cells[:2] == ["jetson-lab-2", "jetson-orin-nano"]
    assert "site=lab" in cells[2] and "ring=prod" in cells[2]
    assert cells[3:6] == ["online", MODEL, "v2"]
    assert cells[6] == "35 s ago"
    assert by_id["x86-plant-c"][3] == "offline"

    # one section per device class, each with a latency and a memory plot per model
    sections = root.find_all("section", class_="device-class")
    assert sorted(s.attrs["data-device-class"] for s in sections) == list(CLASSES)
    aggs = pv.aggregate(build_profiles())
    for section in sections:
        cls = section.attrs["data-device-class"]
        plots = section.find_all("svg", class_="plot")
        assert sorted(p.attrs["data-plot"] for p in plots) == ["latency", "memory"]
        latency = next(p for p in plots if p.attrs["data-plot"] == "latency")
        n_devices = sum(1 for d in _FLEET if d[1] == cls)
        n_v2 = sum(1 for d in _FLEET if d[1] == cls and 2 in d[4])
        # a p50 and a p95 dot per device and version, with the device id in its tooltip
        dots = [c for c in latency.find_all("circle") if c.find_all("title")]
        assert len(dots) == 2 * (n_devices + n_v2)
        axis = latency.find_all("text", class_="axis")[0].text()
        assert ("log scale" in axis) == (cls == "industrial-x86-gateway")
        assert "ms" in axis
        memory = next(p for p in plots if p.attrs["data-plot"] == "memory")
        assert "MiB" in memory.find_all("text", class_="axis")[0].text()
        tips = {t.text() for t in memory.find_all("title")}
        for dev, dcls, _o, _a, _p95, rss in _FLEET:
            if dcls == cls:
                assert f"{dev}: peak {format_number(rss[1])} MiB" in tips
        # legend names the versions in their colors
        legend = {t.text() for t in latency.find_all("text", class_="legend")}
        assert f"v1 ({n_devices})" in legend and f"v2 ({n_v2})" in legend
        fills = {c.attrs.get("fill") for c in latency.find_all("circle")}
        assert {PALETTE[0], PALETTE[1]} <= fills
        # the aggregate table repeats profiles_view's numbers
        for tr in section.find_all("tr")[1:]:
            version = int(tr.attrs["data-version"])
            agg = next(a for a in aggs if a.device_class == cls and a.version == version)
            tds = [td.text() for td in tr.find_all("td")]
            assert tds[1:8] == [
                f"v{version}", str(agg.count), format_number(agg.p50_ms_median),
                format_number(agg.p95_ms_median), format_number(agg.p99_ms_median),
                format_number(agg.p95_ms_max), format_number(agg.peak_rss_mb_max),
            ]
    rpi = next(s for s in sections if s.attrs["data-device-class"] == "raspberry-pi-4")
    v2 = rpi.find_all("tr", data_version="2")[0]
    assert [td.text() for td in v2.find_all("td")][4] == "0.405"
    assert "+98% vs v1" in v2.text()
    legend = {t.text() for t in rpi.find_all("text", class_="legend")}
    assert "p95 budget 0.5 ms" in legend and "budget 256 MiB (off scale)" in legend


def test_report_rollout_waves_and_decisions(report_html: str) -> None:
    root = parse(report_html)
    rollout = root.find_all("article", data_rollout_id="ro-0042")[0]
    assert "v1 → v2" in rollout.find_all("h3")[0].text()
    waves = rollout.find_all("div", class_="wave")
    assert [w.attrs["data-wave"] for w in waves] == ["wave 1 · canary", "wave 2 · early",
                                                     "wave 3 · rest"]
    second = waves[1]
    segs = {s.attrs["data-status"]: s.attrs["style"] for s in second.find_all("span", class_="seg")}
    assert set(segs) == {"installed", "rolled_back"}
    assert "width:50.000%" in segs["installed"] and STATUS_COLORS["rolled_back"] in segs[
        "rolled_back"]
    counts = [c.text() for c in second.find_all("span", class_="count")]
    assert counts == ["2 installed", "0 failed", "2 rolled back", "0 pending"]
    log = rollout.find_all("table", class_="decisions")[0].find_all("tr")[1:]
    assert len(log) == 5
    tripped = log[3]
    assert "bad" in tripped.attrs["class"].split()
    assert [td.text() for td in tripped.find_all("td")][1:] == [
        "wave 2 · early", "raspberry-pi-4", "rollback", GATE_REASON]
    assert "<operator> must resume" in log[4].text()


def test_wave_from_statuses() -> None:
    wave = WaveSummary.from_statuses(
        "wave 2", ["installed", "no_change", "rolled_back", "sent", "timed_out", "excluded",
                   "waiting_offline", "something_new"], state="running")
    assert (wave.installed, wave.unchanged, wave.failed, wave.rolled_back, wave.in_progress,
            wave.pending) == (1, 1, 1, 1, 1, 2)
    assert wave.total == 7
    counts = [c.text() for c in parse(render_report(ReportData(
        generated_at=NOW, rollouts=[RolloutSummary("r", MODEL, 2, "running", waves=[wave])])
    )).find_all("span", class_="count")]
    # a device that already had the version is never shown as installed
    assert counts == ["1 installed", "1 already had it", "1 in progress", "1 failed",
                      "1 rolled back", "2 pending"]


def test_report_escapes_device_text(report_html: str) -> None:
    assert HOSTILE_ID not in report_html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in report_html
    assert report_html.count("<script") == 1  # only the report's own script
    assert "lab<b>" not in report_html and "site=lab&lt;b&gt;" in report_html
    assert "&lt;operator&gt;" in report_html
    root = parse(report_html)
    assert root.find_all("b") == []
    assert len(root.find_all("tr", data_device_id=HOSTILE_ID)) == 1  # attribute round-trips


def test_report_is_self_contained(report_html: str) -> None:
    lowered = report_html.lower()
    for needle in ("http://", "https://", "//cdn", "url(", "@import", "src=", "<link",
                   "<iframe", "<img", "<object", "<embed", "xlink:href"):
        assert needle not in lowered, needle
    root = parse(report_html)
    for node in root.iter():
        for name, value in node.attrs.items():
            if name in ("href", "src", "action", "data", "poster"):
                assert value.startswith("#"), f"{node.tag} {name}={value!r}"
    assert len(root.find_all("script")) == 1 and len(root.find_all("style")) == 1


def test_report_shows_each_class_variant_and_its_figures() -> None:
    from fleetlite.fleet.report import RolloutSummary, VariantSummary

    row = {"variant": "int8", "probed": "2", "passed": "2", "p95_ms": "40.0",
           "budget_p95_ms": "150", "peak_rss_mb": "90.0", "budget_rss_mb": "1024",
           "fidelity": "0.970", "why": ""}
    slow = {**row, "variant": "default", "p95_ms": "210.0", "fidelity": "1.000",
            "why": "median p95 210.0 ms > budget 150 ms"}
    rollout = RolloutSummary("ro-v", "anomaly", 2, "completed", variants=[
        VariantSummary("raspberry-pi-4", "int8", False, "class raspberry-pi-4 gets int8: ...",
                       [slow, row]),
        VariantSummary("jetson-orin-nano", "default", True, "pinned by the operator", [row]),
        VariantSummary("small-arm-gateway", "", False, "no variant fits", [])])
    doc = render_report(ReportData(generated_at=NOW, rollouts=[rollout]))
    assert "Variants per device class" in doc
    assert "default (pinned)" in doc and "excluded" in doc
    assert "median p95 210.0 ms &gt; budget 150 ms" in doc and "0.970" in doc


def test_a_shadow_rollout_shows_each_class_verdict_and_p95_figures() -> None:
    rows = [{"class": "raspberry-pi-4", "verdict": "fail (low_agreement)", "agreement": "91.2%",
             "samples": "240", "active_alone_p95_ms": "0.450", "active_shadowed_p95_ms": "0.510",
             "budget_p95_ms": "0.563", "candidate_p95_ms": "0.620",
             "reason": "shadow verdict for class raspberry-pi-4: fail"},
            {"class": "jetson-orin-nano", "verdict": "pass", "agreement": "100.0%"}]
    rollout = RolloutSummary("ro-s", "home-lm", 2, "aborted", shadow=rows)
    doc = render_report(ReportData(generated_at=NOW, rollouts=[rollout]))
    assert "Shadow evaluation" in doc and "Active p95 alone ms" in doc
    assert '<span class="badge bad">fail (low_agreement)</span>' in doc
    assert '<span class="badge good">pass</span>' in doc
    assert "0.563" in doc and "91.2%" in doc


def test_empty_report_renders() -> None:
    doc = render_report(ReportData(generated_at=NOW))
    root = parse(doc)
    assert root.find_all("div", id="fleet-size")[0].text() == "0"
    assert "No devices." in doc and "No rollouts." in doc


def test_write_report(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    out = write_report(tmp_path / "sub" / "fleet.html", build_data())
    assert out.read_text(encoding="utf-8") == render_report(build_data())
    assert [p.name for p in out.parent.iterdir()] == ["fleet.html"]
    # a missing directory is not made silently; a directory is not a file name
    with pytest.raises(FleetError, match=r"the directory \S*missing does not exist \(create it"):
        write_report(tmp_path / "missing" / "fleet.html", build_data())
    assert not (tmp_path / "missing").exists()
    with pytest.raises(FleetError, match="sub is a directory: give the report a file name"):
        write_report(tmp_path / "sub", build_data())
    assert [p.name for p in out.parent.iterdir()] == ["fleet.html"]  # no temp file left


# -- headless Chromium --------------------------------------------------------------------------


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    if shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed and apt-get is unavailable to install it "
                    "(run tools/chromium.sh on a Debian-like machine)")
    proc = subprocess.run(["bash", str(REPO / "tools" / "chromium.sh")], capture_output=True,
                          text=True, timeout=900, check=False)
    found = shutil.which("chromium")
    assert proc.returncode == 0 and found, f"tools/chromium.sh failed:\n{proc.stdout}{proc.stderr}"
    return found


def _chromium_cmd(binary: str, profile_dir: str, *extra: str) -> list[str]:
    return [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
            "--force-device-scale-factor=1", f"--user-data-dir={profile_dir}", *extra]


@dataclass
class Png:
    width: int
    height: int
    channels: int
    pixels: bytes  # rows of width*channels bytes, 8 bits per sample

    def rgb(self, x: int, y: int) -> tuple[int, int, int]:
        i = (y * self.width + x) * self.channels
        r, g, b = self.pixels[i:i + 3]
        return r, g, b


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def decode_png(data: bytes) -> Png:
    """Decode an 8-bit RGB/RGBA non-interlaced PNG (what Chromium writes) with zlib alone."""
    import numpy as np

    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, ihdr = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            ihdr = body
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    width, height, depth, color, _comp, _filt, interlace = struct.unpack(">IIBBBBB", ihdr)
    assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
    bpp = 3 if color == 2 else 4
    stride = width * bpp
    raw = zlib.decompress(idat)
    assert len(raw) == height * (stride + 1)
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        ftype = raw[y * (stride + 1)]
        line = np.frombuffer(raw, dtype=np.uint8, count=stride, offset=y * (stride + 1) + 1)
        if ftype == 0:
            cur = line.copy()
        elif ftype == 1:  # Sub: running sum per channel
            cur = (np.cumsum(line.reshape(width, bpp).astype(np.int64), axis=0) % 256
                   ).astype(np.uint8).reshape(stride)
        elif ftype == 2:  # Up
            cur = line + prev
        else:  # Average / Paeth: sequential along the row
            b = prev.tolist()
            vals = line.tolist()
            res = [0] * stride
            for i in range(stride):
                a = res[i - bpp] if i >= bpp else 0
                c = b[i - bpp] if i >= bpp else 0
                pred = (a + b[i]) // 2 if ftype == 3 else _paeth(a, b[i], c)
                res[i] = (vals[i] + pred) & 0xFF
            cur = np.array(res, dtype=np.uint8)
        out[y] = cur
        prev = cur
    return Png(width, height, bpp, out.tobytes())


def _hex_rgb(color: str) -> tuple[int, int, int]:
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


@pytest.fixture(scope="module")
def chromium_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    binary = _chromium()
    work = tmp_path_factory.mktemp("chromium")
    page = write_report(work / "report.html", build_data())
    shot = work / "report.png"
    url = page.resolve().as_uri()
    with tempfile.TemporaryDirectory() as prof_a, tempfile.TemporaryDirectory() as prof_b:
        start = time.monotonic()
        shoot = subprocess.Popen(
            _chromium_cmd(binary, prof_a, f"--screenshot={shot}",
                          f"--window-size={WINDOW[0]},{WINDOW[1]}", url),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=work)
        dump = subprocess.Popen(
            _chromium_cmd(binary, prof_b, "--enable-logging=stderr", "--v=0", "--dump-dom",
                          url),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=work)
        shot_out, shot_err = shoot.communicate(timeout=90)
        dom, dump_err = dump.communicate(timeout=90)
        elapsed = time.monotonic() - start
    return {
        "shot_rc": shoot.returncode, "shot_err": shot_err.decode(errors="replace"),
        "dump_rc": dump.returncode, "dom": dom.decode(errors="replace"),
        "dump_err": dump_err.decode(errors="replace"), "png": shot, "elapsed": elapsed,
        "shot_out": shot_out.decode(errors="replace"),
    }


def test_chromium_runs_the_page_script(chromium_run: dict[str, object]) -> None:
    dom = str(chromium_run["dom"])
    assert chromium_run["dump_rc"] == 0, chromium_run["dump_err"]
    if 'data-rendered="ok"' not in dom:
        start = dom.find('id="script-error"')
        pytest.fail("the report's script did not finish: "
                    + (dom[start:start + 2000] if start >= 0 else str(chromium_run["dump_err"])))
    assert 'data-plots="6"' in dom
    n_points = sum(2 * len(p95) + len(p95) for *_rest, p95, _rss in _FLEET)
    assert f'data-points="{n_points}"' in dom
    console_errors = [line for line in str(chromium_run["dump_err"]).splitlines()
                      if "CONSOLE" in line and ("Error" in line or "error" in line)]
    assert console_errors == []


def test_chromium_screenshot(chromium_run: dict[str, object]) -> None:
    assert chromium_run["shot_rc"] == 0, chromium_run["shot_err"]
    png_path = chromium_run["png"]
    assert isinstance(png_path, Path) and png_path.exists(), chromium_run["shot_err"]
    png = decode_png(png_path.read_bytes())
    assert (png.width, png.height) == WINDOW
    total = png.width * png.height
    import numpy as np

    arr = np.frombuffer(png.pixels, dtype=np.uint8).reshape(-1, png.channels)[:, :3]
    packed = (arr[:, 0].astype(np.int64) << 16) | (arr[:, 1].astype(np.int64) << 8) | arr[:, 2]
    values, counts = np.unique(packed, return_counts=True)
    colors = {(int(v) >> 16, (int(v) >> 8) & 255, int(v) & 255): int(n)
              for v, n in zip(values, counts)}
    white_ish = sum(n for (r, g, b), n in colors.items() if min(r, g, b) >= 240)
    dark = sum(n for (r, g, b), n in colors.items() if max(r, g, b) < 110)
    assert white_ish < 0.97 * total, "page looks blank"
    assert dark > 0.002 * total, "no text drawn"
    assert len(colors) > 200, "too few distinct colors for a rendered report"
    # both version colors are drawn by the plots (dots, legend swatches, bands of boxes)
    for color in PALETTE[:2]:
        assert colors.get(_hex_rgb(color), 0) > 150, f"plot color {color} missing"
    # the wave progress bars (at the bottom of the page)
    for status in ("installed", "rolled_back", "pending"):
        assert colors.get(_hex_rgb(STATUS_COLORS[status]), 0) > 2000, f"{status} bar missing"


def _main(argv: Sequence[str]) -> None:  # pragma: no cover - manual preview helper
    out = Path(argv[0] if argv else "fleet-report.html")
    write_report(out, build_data())
    print(os.fspath(out))


if __name__ == "__main__":  # pragma: no cover
    import sys

    _main(sys.argv[1:])
