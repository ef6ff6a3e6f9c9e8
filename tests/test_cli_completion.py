"""Shell completion (issue 12): the script ``fleetlite completion bash`` prints, sourced in a real
bash, completes commands, subcommands, options and option choices; the zsh one loads through
bashcompinit."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.test_operator_mistakes import FLEETLITE


def complete(*words: str) -> list[str]:
    """What bash offers after ``fleetlite WORDS`` (the last word is the one being typed)."""
    line = " ".join(["fleetlite", *words])
    script = (f'source <("{FLEETLITE}" completion bash)\n'
              f"COMP_WORDS=({line}); COMP_CWORD={len(words)}\n"
              "_fleetlite_complete; printf '%s\\n' \"${COMPREPLY[@]}\"\n")
    if words and words[-1] == "":
        script = script.replace(f"COMP_WORDS=({line})", f"COMP_WORDS=({line} '')")
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                          check=True)
    return [w for w in done.stdout.splitlines() if w]


@pytest.mark.parametrize("words, offered, not_offered", [
    (("de",), ["demo", "devices"], ["rollout"]),
    (("devices", "p"), ["ping", "profile"], ["list"]),
    (("devices", "ping", "--t"), ["--timeout", "--tag", "--tls-ca"], ["--model"]),
    (("devices", "list", "-o", ""), ["json", "table", "yaml"], ["--db"]),
    (("rollout", "create", "RELEASE", "--on-failure", "r"), ["rollback"], ["pause"]),
    (("config", "use"), ["use-context"], []),
    (("completion", ""), ["bash", "zsh"], []),
])
def test_bash_completes_commands_options_and_choices(words: tuple[str, ...],
                                                     offered: list[str],
                                                     not_offered: list[str]) -> None:
    got = complete(*words)
    assert set(offered) <= set(got), (words, got)
    assert not set(not_offered) & set(got), (words, got)


def test_the_zsh_script_loads() -> None:
    if shutil.which("zsh") is None:
        pytest.skip("zsh is not installed here; the bash test covers the completion itself")
    done = subprocess.run(["zsh", "-c", f'source <("{FLEETLITE}" completion zsh) && '
                           "whence -w _fleetlite_complete"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0 and "function" in done.stdout, done.stderr
