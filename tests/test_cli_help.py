"""Every command of ``fleetlite`` and ``fleetlite-agent`` teaches (issue 12): its ``--help`` has
examples and exit codes, and a command that prints a result takes ``-o table|json|yaml``."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from fleetlite.agent.cli import build_parser as agent_parser
from fleetlite.fleet.cli import build_parser as fleet_parser
from fleetlite.fleet.cli_completion import _subparsers

# Commands that print no result a script would parse: a daemon, a live or interactive view, a
# file written, a change confirmed in a sentence.
NO_OUTPUT_FORMAT = {
    "fleetlite demo", "fleetlite serve", "fleetlite rollout watch", "fleetlite completion",
    "fleetlite config use-context", "fleetlite config set-context",
    "fleetlite config delete-context", "fleetlite config current-context",
    "fleetlite config view", "fleetlite config get-contexts",
    "fleetlite keys create", "fleetlite keys public", "fleetlite keys root init",
    "fleetlite keys root rotate", "fleetlite keys root sign", "fleetlite release build",
    "fleetlite release sign", "fleetlite-agent run", "fleetlite-agent chat",
}


def commands() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    def walk(parser: argparse.ArgumentParser, path: str
             ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
        subs = _subparsers(parser)
        if not subs:
            yield path, parser
        for name, sub in sorted(subs.items()):
            yield from walk(sub, f"{path} {name}")

    yield from walk(fleet_parser(), "fleetlite")
    yield from walk(agent_parser(), "fleetlite-agent")


LEAVES = dict(commands())


@pytest.mark.parametrize("name", sorted(LEAVES))
def test_every_command_has_examples_exit_codes_and_an_output_format(name: str) -> None:
    parser = LEAVES[name]
    text = parser.format_help()
    assert "examples:" in text, f"{name} --help has no examples"
    assert "exit codes" in text, f"{name} --help does not say its exit codes"
    assert name.split(" ", 1)[0] + " " in text.split("examples:", 1)[1], \
        f"{name}: the examples do not show the command"
    options = {o for action in parser._actions for o in action.option_strings}
    if name not in NO_OUTPUT_FORMAT:
        assert {"-o", "--output"} <= options, f"{name} prints a result but has no -o"
        choices = next(a.choices for a in parser._actions if "--output" in a.option_strings)
        assert list(choices or ()) == ["table", "json", "yaml"], name
