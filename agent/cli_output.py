"""``-o table|json|yaml`` for the agent's commands that print a result (``--json`` stays as an
alias of ``-o json``), and printing a document in the chosen format."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional, TextIO

__all__ = ["add_output", "emit", "structured"]

OUTPUTS = ("table", "json", "yaml")


def add_output(parser: argparse.ArgumentParser, what: str) -> None:
    """Add ``-o/--output`` (default table) and ``--json``; ``what``: what json/yaml print."""
    parser.add_argument("-o", "--output", choices=OUTPUTS, default="table",
                        help=f"output format: table (default) for people; json or yaml print "
                        f"{what}")
    parser.add_argument("--json", dest="output", action="store_const", const="json",
                        help="the same as -o json")


def structured(args: argparse.Namespace) -> bool:
    """True when the user asked for json or yaml."""
    return getattr(args, "output", "table") != "table"


def emit(args: argparse.Namespace, doc: Any, out: Optional[TextIO] = None) -> None:
    """Print ``doc`` as JSON or YAML, as ``args`` asked (on ``out``, default stdout)."""
    out = out if out is not None else sys.stdout
    if args.output == "yaml":
        import yaml

        out.write(yaml.safe_dump(doc, sort_keys=True))
    else:
        out.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
