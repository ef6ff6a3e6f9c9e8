"""``fleetlite-agent generate`` and ``chat`` against a real agent process serving the project's LM
(declared in agent.yaml with its tokenizer) through its local socket, and on a .tflite file run
in place; telemetry carries the LM's counts and timings, never the prompts or replies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetlite.agent.generate_cli import chat_prompt
from fleetlite.sdk import topics
from tests.agent_harness import AgentProcess, write_config
from tests.mqtt_harness import Collector, Mosquitto
from tests.test_generation import LM, reference

TEMPLATE = "<user> {prompt} <bot>"


def replies() -> dict[str, str]:
    return {case["prompt"]: case["reply"] for case in reference("home_lm")["prompts"]}


def agent_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleetlite.agent.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=180, check=False,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture
def agent(tmp_path: Path, broker: Mosquitto) -> Iterator[tuple[AgentProcess, Path]]:
    ref = reference("home_lm")
    config = write_config(tmp_path / "gw", port=broker.port, telemetry_s=0.5, extra={
        "models": [{"name": "home-lm", "path": str(LM / "home_lm.tflite"), "version": 1,
                    "tokenizer": str(LM / ref["tokenizer"]["file"]),
                    "prompt_template": TEMPLATE}]})
    process = AgentProcess(config).start()
    try:
        process.wait_for_log("serving language model home-lm", timeout=60)
        process.wait_for_log("local API listening", timeout=60)
        yield process, tmp_path / "gw" / "agent.sock"
    finally:
        process.stop()


def test_generate_streams_the_served_models_reply(
        agent: tuple[AgentProcess, Path], broker: Mosquitto) -> None:
    _, sock = agent
    collector = Collector(broker.host, broker.port, [topics.device_topic("gw-1", "telemetry")],
                          client_id="test-telemetry").start()
    try:
        for prompt, reply in list(replies().items())[:3]:
            done = agent_cli("generate", "home-lm", "--socket", str(sock), "--prompt", prompt,
                             "--stats")
            assert done.returncode == 0, done.stderr
            assert done.stdout == reply + "\n"
            assert "tokens, stop: stop_token; time to first token" in done.stderr
        as_json = json.loads(agent_cli("generate", "home-lm", "--socket", str(sock), "--json",
                                       stdin="lock the front door\n").stdout)
        assert as_json["text"] == replies()["lock the front door"]
        assert as_json["stats"]["generated_tokens"] > 0
        # telemetry: the LM's counts and timings, and no prompt or reply text
        found = collector.wait_for("/telemetry", timeout=60, predicate=lambda m: json.loads(
            m.payload)["models"].get("home-lm", {}).get("generations", 0) >= 4)
        payload = found[-1].payload.decode()
        counts = json.loads(payload)["models"]["home-lm"]
        assert counts["generated_tokens"] > 0 and counts["decode_tokens_per_s"] > 0
        for text in list(replies()) + list(replies().values()):
            assert text not in payload
    finally:
        collector.stop()


def test_chat_keeps_the_conversation(agent: tuple[AgentProcess, Path]) -> None:
    _, sock = agent
    lines = "turn off the kitchen lights\n\nlock the front door\n"
    done = agent_cli("chat", "home-lm", "--socket", str(sock), stdin=lines)
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert out[0] == replies()["turn off the kitchen lights"]
    assert len(out) == 2 and out[1].startswith("ok,")  # the second turn, after the first


def test_errors_name_the_fix(agent: tuple[AgentProcess, Path], tmp_path: Path) -> None:
    _, sock = agent
    missing = agent_cli("generate", "nope", "--socket", str(sock), "-p", "hi")
    assert missing.returncode == 1 and "no language model named 'nope'" in missing.stderr
    assert "home-lm" in missing.stderr
    nobody = agent_cli("generate", "home-lm", "--socket", str(tmp_path / "none.sock"), "-p", "x")
    assert nobody.returncode == 1 and "is fleetlite-agent running" in nobody.stderr
    empty = agent_cli("generate", "home-lm", "--socket", str(sock), stdin="")
    assert empty.returncode == 2 and "empty prompt" in empty.stderr


def test_a_tflite_file_runs_in_place() -> None:
    ref = reference("home_lm")
    done = agent_cli("generate", str(LM / "home_lm.tflite"), "--tokenizer",
                     str(LM / ref["tokenizer"]["file"]), "--prompt-template", TEMPLATE,
                     "-p", "open the living room blinds")
    assert done.returncode == 0, done.stderr
    assert done.stdout == replies()["open the living room blinds"] + "\n"
    # a model in the other cache layout, with a mask input and another layer count
    alt = reference("alt_lm")
    case = alt["prompts"][0]
    other = agent_cli("generate", str(LM / "alt_lm.tflite"), "--tokenizer",
                      str(LM / alt["tokenizer"]["file"]), "--prompt-template",
                      alt["prompt_template"], "-p", case["prompt"])
    assert other.returncode == 0, other.stderr
    assert other.stdout == case["reply"] + "\n"
    no_tokenizer = agent_cli("generate", str(LM / "home_lm.tflite"), "-p", "x")
    assert no_tokenizer.returncode == 1 and "--tokenizer" in no_tokenizer.stderr


def test_chat_prompt_writes_earlier_turns_in_the_template() -> None:
    assert chat_prompt(TEMPLATE, [], "hi") == "hi"
    history = [("turn on the lights", "ok, the lights are on.")]
    assert chat_prompt(TEMPLATE, history, "lock the door") == (
        "turn on the lights <bot> ok, the lights are on. <user> lock the door")
