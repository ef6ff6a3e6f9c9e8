"""Every `fleetlite` / `fleetlite-agent` command shown in README.md and docs/ parses with the
real argument parsers: the docs cannot drift from the CLI unnoticed."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"```(?:sh|bash)\n(.*?)```", re.S)
PREFIX = re.compile(r"^(?:[^\s$(]*/)?(fleetlite-agent|fleetlite)(?=\s|$)")


def documented_commands() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for block in BLOCK.findall(doc.read_text()):
            for raw in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#.*$", "", raw).strip()
                if PREFIX.match(line):
                    found.extend((doc.name, variant) for variant in expand(line))
    return found


def expand(line: str) -> list[str]:
    """``pause|resume ID`` -> both; ``[--keep]`` -> with the option; ``-o table|json``."""
    line = re.sub(r"\[([^\]]*)\]", r"\1", line)
    words = line.split()
    variants: list[list[str]] = [[]]
    for word in words:
        choices = word.split("|") if "|" in word and not word.startswith("-") else [word]
        variants = [[*v, c] for v in variants for c in choices]
    return [" ".join(v) for v in variants]


COMMANDS = documented_commands()


def test_the_docs_show_commands() -> None:
    assert len(COMMANDS) > 30


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[c for _, c in COMMANDS])
def test_documented_command_parses(doc: str, command: str) -> None:
    from fleetlite.agent.cli import build_parser as agent_parser
    from fleetlite.fleet.cli import build_parser as fleet_parser

    tokens = shlex.split(command)
    program = PREFIX.match(command).group(1)  # type: ignore[union-attr]
    parser = agent_parser() if program == "fleetlite-agent" else fleet_parser()
    tokens = [t.replace("table|json|yaml", "table") for t in tokens[1:]]
    try:
        parser.parse_args(tokens)
    except SystemExit as exc:
        pytest.fail(f"{doc}: `{command}` does not parse (exit {exc.code})")
