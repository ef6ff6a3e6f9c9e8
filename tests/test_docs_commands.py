"""Every `fleetlite` / `fleetlite-agent` command shown in README.md and docs/ parses with the
real argument parsers: the docs cannot drift from the CLI unnoticed. (tests/test_docs_walkthrough.py
also runs them.)"""

from __future__ import annotations

import re
import shlex

import pytest

from tests.doc_commands import DOCS, shell_commands

PREFIX = re.compile(r"^(?:[^\s$(]*/)?(fleetlite-agent|fleetlite)(?=\s|$)")
COMMANDS = [(doc.name, command) for doc in DOCS for command in shell_commands(doc)
            if PREFIX.match(command)]


def test_the_docs_show_commands() -> None:
    assert len(COMMANDS) > 30


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[c for _, c in COMMANDS])
def test_documented_command_parses(doc: str, command: str) -> None:
    from fleetlite.agent.cli import build_parser as agent_parser
    from fleetlite.fleet.cli import build_parser as fleet_parser

    tokens = shlex.split(command)
    program = PREFIX.match(command).group(1)  # type: ignore[union-attr]
    parser = agent_parser() if program == "fleetlite-agent" else fleet_parser()
    try:
        parser.parse_args(tokens[1:])
    except SystemExit as exc:
        pytest.fail(f"{doc}: `{command}` does not parse (exit {exc.code})")
