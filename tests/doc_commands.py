"""The shell commands shown in README.md and docs/, and a runner that executes them as written and
checks them off, so a walkthrough test can prove it ran every command of a document.

A command is one line of a ```sh or ```bash block (backslash continuations joined, trailing
``# comments`` dropped). ``pause|resume ID`` stands for one command per choice and ``[--keep]``
for the command with the option. Placeholders a reader fills in (``RELEASE_ID``, ``XXXX``, example
hosts) are replaced by the runner's substitutions, nothing else.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent
_BLOCK = re.compile(r"```(?:sh|bash)\n(.*?)```", re.S)


def shell_commands(doc: Path) -> list[str]:
    """Every command of ``doc``'s shell blocks, choices expanded, in document order."""
    found: list[str] = []
    for block in _BLOCK.findall(doc.read_text()):
        for raw in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", raw).strip()
            line = re.sub(r"\s{2,}", " ", line)
            if line and not line.startswith("#"):
                found.extend(v for v in expand(line) if v not in found)
    return found


def expand(line: str) -> list[str]:
    """``pause|resume ID`` -> both; ``[--keep]`` -> without and with the option."""
    optional = re.search(r"\s\[([^\]]*)\]", line)
    if optional:
        bare = line[:optional.start()] + line[optional.end():]
        full = line[:optional.start()] + " " + optional.group(1) + line[optional.end():]
        return expand(bare) + expand(full)
    variants: list[list[str]] = [[]]
    for word in line.split(" "):
        parts = word.split("|")
        plain = len(parts) > 1 and all(re.fullmatch(r"[\w-]+", part) for part in parts) \
            and not word.startswith("-")
        choices = word.split("|") if plain else [word]
        variants = [[*v, c] for v in variants for c in choices]
    return [" ".join(v) for v in variants]


class Walkthrough:
    """Runs ``doc``'s commands as written (after ``subst``) in ``cwd`` with ``env``.

    ``exempt`` maps a command to the reason it is not run here (another test runs it, or it
    changes the host); :meth:`assert_all_run` fails while any other command was not run.
    """

    def __init__(self, doc: Path, cwd: Path, env: dict[str, str],
                 exempt: dict[str, str] | None = None) -> None:
        self.doc = doc
        self.cwd = cwd
        self.env = {**os.environ, **env,
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.subst: dict[str, str] = {}
        self.commands = shell_commands(doc)
        self.exempt = dict(exempt or {})
        stale = set(self.exempt) - set(self.commands)
        assert not stale, f"{doc.name} no longer shows these exempted commands: {stale}"
        self.ran: list[str] = []
        self.background: list[tuple[str, subprocess.Popen[bytes]]] = []

    def command(self, prefix: str) -> str:
        """The one command of the doc that starts with ``prefix``."""
        matches = [c for c in self.commands if c.startswith(prefix)]
        assert len(matches) == 1, f"{self.doc.name}: {len(matches)} commands start with " \
                                  f"{prefix!r}: {matches}"
        return matches[0]

    def resolve(self, command: str) -> str:
        for placeholder, value in self.subst.items():
            command = command.replace(placeholder, value)
        return command

    def run(self, *prefixes: str, expect: int = 0, cwd: Path | None = None, then: str = "",
            timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """Run the command starting with each prefix, in one shell (``set -eo pipefail``, so
        shell variables carry over), then the check ``then``; assert the exit code."""
        commands = [self.command(prefix) for prefix in prefixes]
        shell = "\n".join([*(self.resolve(command) for command in commands), then])
        proc = self.run_plain(shell, expect=expect, cwd=cwd, timeout=timeout, shown=commands)
        self.ran.extend(commands)
        return proc

    def run_plain(self, shell: str, *, expect: int = 0, cwd: Path | None = None,
                  timeout: float = 180, shown: list[str] | None = None
                  ) -> subprocess.CompletedProcess[str]:
        """Run a shell snippet that is not a documented command (set-up, a check)."""
        proc = subprocess.run(["bash", "-c", "set -eo pipefail\n" + shell], cwd=cwd or self.cwd,
                              env=self.env, capture_output=True, text=True, timeout=timeout,
                              check=False)
        assert proc.returncode == expect, (
            f"{self.doc.name}: {shown or shell}\n(run as `{shell}`) exited {proc.returncode}, "
            f"expected {expect}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
        return proc

    def export(self, prefix: str) -> None:
        """An ``export NAME=value`` line: into the environment of the next commands."""
        command = self.command(prefix)
        name, _, value = self.resolve(command).removeprefix("export ").partition("=")
        self.env[name] = value
        self.ran.append(command)

    def start(self, prefix: str, *, cwd: Path | None = None, log: Path) -> None:
        """Start a long-running command (a daemon) in the background; :meth:`stop` ends it."""
        command = self.command(prefix)
        self.start_plain(self.resolve(command), cwd=cwd, log=log, shown=command)
        self.ran.append(command)

    def start_plain(self, shell: str, *, cwd: Path | None = None, log: Path,
                    shown: str | None = None) -> None:
        with log.open("ab") as out:
            proc = subprocess.Popen(["bash", "-c", "exec " + shell], cwd=cwd or self.cwd,
                                    env=self.env, stdout=out, stderr=subprocess.STDOUT)
        self.background.append((shown or shell, proc))

    def stop(self) -> dict[str, list[int]]:
        """SIGTERM to every daemon started (like systemd); their exit codes by command."""
        codes: dict[str, list[int]] = {}
        for _, proc in self.background:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for command, proc in self.background:
            try:
                code = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait(10)
            codes.setdefault(command, []).append(code)
        self.background.clear()
        return codes

    def assert_all_run(self) -> None:
        missing = [c for c in self.commands if c not in self.ran and c not in self.exempt]
        assert not missing, f"{self.doc.name}: commands shown but not run by this walkthrough: " \
                            f"{missing}"
