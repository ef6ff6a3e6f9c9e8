"""Shell completion for ``fleetlite``: ``fleetlite completion bash`` (or ``zsh``) prints a script
that completes commands, subcommands, options and the values of options with a fixed set of
choices (``-o table|json|yaml``), made from the same argparse parsers the commands use.

    source <(fleetlite completion bash)              # this shell
    fleetlite completion bash > /etc/bash_completion.d/fleetlite
    fleetlite completion zsh > "${fpath[1]}/_fleetlite"   # zsh, through bashcompinit
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Iterator

__all__ = ["completion_script", "command_words"]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def command_words(parser: argparse.ArgumentParser, path: str = ""
                  ) -> Iterator[tuple[str, list[str], dict[str, list[str]]]]:
    """Per command path (``""``, ``"devices"``, ``"devices ping"``, ...): the words that may
    follow it (subcommands, then options) and the choices of its options that have them."""
    subs = _subparsers(parser)
    options: list[str] = []
    choices: dict[str, list[str]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue
        options.extend(action.option_strings)
        if not action.option_strings and action.choices is not None:  # e.g. bash|zsh
            options.extend(str(c) for c in action.choices)
        if action.option_strings and action.choices is not None:
            for option in action.option_strings:
                choices[option] = [str(c) for c in action.choices]
    yield path, sorted(subs) + sorted(options), choices
    for name, sub in sorted(subs.items()):
        yield from command_words(sub, f"{path} {name}".strip())


def completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for ``shell`` (``bash`` or ``zsh``)."""
    prog = parser.prog
    words, choices = [], []
    for path, following, option_choices in command_words(parser):
        key = path.replace(" ", "__") or "_"
        words.append(f"    [{shlex.quote(key)}]={shlex.quote(' '.join(following))}")
        for option, values in option_choices.items():
            choices.append(f"    [{shlex.quote(key + '|' + option)}]="
                           f"{shlex.quote(' '.join(values))}")
    name = f"_{prog.replace('-', '_')}_complete"
    body = f"""# {prog} completion ({shell}); made by `{prog} completion {shell}`
declare -gA {name}_words=(
{chr(10).join(words)}
)
declare -gA {name}_choices=(
{chr(10).join(choices)}
)
{name}() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="" path="_" word i
    (( COMP_CWORD > 0 )) && prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    for (( i = 1; i < COMP_CWORD; i++ )); do
        word="${{COMP_WORDS[i]}}"
        if [[ "$path" == "_" ]]; then candidate="$word"; else candidate="${{path}}__$word"; fi
        if [[ -n "${{{name}_words[$candidate]+x}}" ]]; then path="$candidate"; fi
    done
    if [[ -n "${{{name}_choices[$path|$prev]+x}}" ]]; then
        COMPREPLY=( $(compgen -W "${{{name}_choices[$path|$prev]}}" -- "$cur") )
        return
    fi
    COMPREPLY=( $(compgen -W "${{{name}_words[$path]}}" -- "$cur") )
}}
complete -o default -F {name} {prog}
"""
    if shell == "zsh":
        return "autoload -U +X bashcompinit && bashcompinit\n" + body
    return body


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``fleetlite completion``."""
    parser = sub.add_parser(
        "completion", help="print a shell completion script (bash, zsh)",
        description="Print a script that completes fleetlite's commands, options and their "
        "choices in bash or zsh.",
        epilog="""examples:
  source <(fleetlite completion bash)                      (this shell)
  fleetlite completion bash | sudo tee /etc/bash_completion.d/fleetlite
  fleetlite completion zsh > "${fpath[1]}/_fleetlite"       (zsh, via bashcompinit)

exit codes: 0 ok, 2 usage error
""", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shell", choices=("bash", "zsh"))
