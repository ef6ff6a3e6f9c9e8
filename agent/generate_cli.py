"""``fleetlite-agent generate`` and ``fleetlite-agent chat``: talk to a small language model on
this gateway, streaming the reply to the terminal as it is produced.

MODEL is either the name of a language model the running agent serves (asked through its local
socket: ``--socket``, else the ``socket:`` of ``--config``, else the default path), or a
``.tflite`` file run here in this process with ``--tokenizer`` (and the release's prompt
template and stop ids, which default to the tokenizer's end-of-sequence id). Prompts and replies
stay on this machine.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TextIO

from fleetlite.agent.cli_output import add_output, emit, structured
from fleetlite.sdk.errors import FleetLiteError

DEFAULT_SOCKET = Path("/run/fleetlite/agent.sock")
MAX_CHAT_TURNS = 16

EXAMPLES = """\
examples:
  fleetlite-agent generate home-lm --prompt "turn off the kitchen lights"
                        ask the model the running agent serves as home-lm (its local socket)
  echo "lock the front door" | fleetlite-agent generate home-lm --stats
                        the prompt from stdin; counts and timings on stderr
  fleetlite-agent generate home_lm.tflite --tokenizer home_lm.spm.model \\
      --prompt-template "<user> {prompt} <bot>" --prompt "open the blinds"
                        run a .tflite file here, without an agent
  fleetlite-agent generate home-lm -p "hi" --temperature 0.8 --top-p 0.9 --seed 7 --json
                        sampled, reproducible, the whole result as JSON
  fleetlite-agent chat home-lm
                        a conversation: each line you type is a turn (Ctrl-D ends it)

exit codes: 0 replied, 1 the model could not answer (the message says why), 2 usage error
"""


def add_parsers(sub: Any) -> None:
    """Add ``generate`` and ``chat`` to the ``fleetlite-agent`` command parser."""
    for name, what in (("generate", "stream a language model's reply to one prompt"),
                       ("chat", "a conversation with a language model, turn by turn")):
        parser = sub.add_parser(
            name, help=what, description=f"{what[0].upper()}{what[1:]}. " + __doc__.split(
                "\n\n", 1)[1].replace("\n", " "),
            epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("model", metavar="MODEL",
                            help="a model name the agent serves, or a .tflite file")
        if name == "generate":
            parser.add_argument("--prompt", "-p",
                                help="the prompt (default: read all of stdin)")
            add_output(parser, "the result (text, stop reason, stats) once it is complete "
                       "(table: the text as it streams)")
        parser.add_argument("--stats", action="store_true",
                            help="print tokens, time to first token and tokens/s on stderr")
        where = parser.add_argument_group("reaching the agent")
        where.add_argument("--socket", type=Path, help="the agent's local socket")
        where.add_argument("--config", "-c", type=Path,
                           help="agent.yaml, for its socket path")
        local = parser.add_argument_group("running a .tflite file here")
        local.add_argument("--tokenizer", type=Path,
                           help="its tokenizer: a SentencePiece .model or a tokenizer.json")
        local.add_argument("--prompt-template", default="{prompt}",
                           help="text around the prompt, with {prompt} once (default: none)")
        local.add_argument("--stop-id", type=int, action="append", default=[],
                           help="a token id that ends the reply (default: the tokenizer's "
                           "end-of-sequence id); repeatable")
        local.add_argument("--threads", type=int, default=1, help="interpreter threads")
        sampling = parser.add_argument_group("sampling (defaults: the release's)")
        sampling.add_argument("--max-tokens", type=int, help="at most this many tokens")
        sampling.add_argument("--temperature", type=float, help="0 is greedy")
        sampling.add_argument("--top-k", type=int, help="sample among the k likeliest (0: off)")
        sampling.add_argument("--top-p", type=float,
                              help="sample within this probability mass (1: off)")
        sampling.add_argument("--seed", type=int, help="makes sampling reproducible")
        sampling.add_argument("--stop", action="append", default=[], metavar="TEXT",
                              help="a text that ends the reply; repeatable")


@dataclass
class Reply:
    """One finished reply: its text, why it stopped and its counts and timings."""

    text: str = ""
    stop_reason: Optional[str] = None
    stats: dict[str, Any] = field(default_factory=dict)


class Backend:
    """Where the model runs: the agent (socket) or this process (a .tflite file)."""

    prompt_template: str = "{prompt}"

    def stream(self, prompt: str, params: dict[str, Any], reply: Reply) -> Iterator[str]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the backend holds."""


class AgentBackend(Backend):
    def __init__(self, socket_path: Path, model: str) -> None:
        from fleetlite.sdk.local_client import LocalClient

        self.model = model
        self.client = LocalClient(socket_path, timeout=300)
        served = {m.get("name"): m for m in self.client.models()}
        found = served.get(model)
        if found is None or found.get("kind") != "generative":
            names = sorted(str(n) for n, m in served.items() if m.get("kind") == "generative")
            raise FleetLiteError(
                f"the agent on {socket_path} serves no language model named {model!r} "
                f"(language models: {', '.join(names) or 'none'}); check the name with "
                "`fleetlite-agent info` or roll the model out first")
        self.prompt_template = str(found.get("prompt_template") or "{prompt}")

    def stream(self, prompt: str, params: dict[str, Any], reply: Reply) -> Iterator[str]:
        with self.client.generate(self.model, prompt, **params) as stream:
            for piece in stream:
                reply.text += piece
                yield piece
            result = stream.result or {}
        reply.stop_reason = result.get("stop_reason")
        reply.stats = dict(result.get("stats") or {})

    def close(self) -> None:
        self.client.close()


class LocalBackend(Backend):
    def __init__(self, model: Path, args: argparse.Namespace) -> None:
        from fleetlite.sdk.runtime.lm_engine import LmEngine
        from fleetlite.sdk.runtime.lm_files import spec_for_files

        if args.tokenizer is None:
            raise FleetLiteError(f"{model} is a file: also give its tokenizer with --tokenizer "
                                 "(a SentencePiece .model or a tokenizer.json)")
        spec, tokenizer = spec_for_files(model, args.tokenizer,
                                         prompt_template=args.prompt_template,
                                         stop_ids=tuple(args.stop_id))
        self.engine = LmEngine(model, spec=spec, tokenizer=tokenizer, num_threads=args.threads)
        self.prompt_template = spec.prompt_template

    def stream(self, prompt: str, params: dict[str, Any], reply: Reply) -> Iterator[str]:
        from fleetlite.sdk.runtime.lm_engine import GenerateParams

        defaults = vars(self.engine.default_params())
        chosen = {k: (tuple(v) if k == "stop_strings" else v) for k, v in params.items()}
        with self.engine.stream(prompt, GenerateParams(**{**defaults, **chosen})) as stream:
            for chunk in stream:
                reply.text += chunk.text
                yield chunk.text
        stats = stream.stats
        reply.stop_reason = stats.stop_reason
        reply.stats = {
            "prompt_tokens": stats.prompt_tokens, "generated_tokens": stats.generated_tokens,
            "time_to_first_token_ms": stats.time_to_first_token_ms,
            "prefill_tokens_per_s": stats.prefill_tokens_per_s,
            "decode_tokens_per_s": stats.decode_tokens_per_s,
        }


def chat_prompt(template: str, history: Sequence[tuple[str, str]], message: str) -> str:
    """The prompt for the next turn: earlier turns and replies in the release's template.

    The engine wraps the prompt as ``before + prompt + after`` (the template split at
    ``{prompt}``), so earlier turns are written between them: the model sees
    ``before u1 after r1 before u2 after`` — each turn in the format it was tuned on.
    """
    before, after = template.split("{prompt}", 1)
    earlier = "".join(f"{user}{after} {answer} {before}" for user, answer in history)
    return earlier + message


def _params(args: argparse.Namespace) -> dict[str, Any]:
    params = {"max_tokens": args.max_tokens, "temperature": args.temperature,
              "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
    chosen: dict[str, Any] = {k: v for k, v in params.items() if v is not None}
    if args.stop:
        chosen["stop_strings"] = list(args.stop)
    return chosen


def _backend(args: argparse.Namespace) -> Backend:
    model = Path(args.model)
    if args.model.endswith(".tflite") or model.is_file():
        if not model.is_file():
            raise FleetLiteError(f"{model}: no such file")
        return LocalBackend(model, args)
    socket_path = args.socket
    if socket_path is None and args.config is not None:
        from fleetlite.agent.config import load_config

        socket_path = load_config(args.config).socket
        if socket_path is None:
            raise FleetLiteError(f"{args.config} has no 'socket:': the agent serves no local "
                                 "API; add one, or run a .tflite file here with --tokenizer")
    return AgentBackend(socket_path or DEFAULT_SOCKET, args.model)


def _print_stats(reply: Reply, err: TextIO) -> None:
    s = reply.stats

    def fmt(key: str, unit: str) -> str:
        value = s.get(key)
        return "-" if value is None else f"{value:.1f}{unit}"

    print(f"[{s.get('generated_tokens', 0)} tokens, stop: {reply.stop_reason}; time to first "
          f"token {fmt('time_to_first_token_ms', ' ms')}, prefill "
          f"{fmt('prefill_tokens_per_s', ' tok/s')}, decode "
          f"{fmt('decode_tokens_per_s', ' tok/s')}]", file=err)


def run(args: argparse.Namespace, *, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout,
        err: TextIO = sys.stderr) -> int:
    """Run ``generate`` or ``chat``; returns the exit code."""
    try:
        backend = _backend(args)
        try:
            if args.command == "generate":
                return _generate(backend, args, stdin, out, err)
            return _chat(backend, args, stdin, out, err)
        finally:
            backend.close()
    except FleetLiteError as exc:
        print(f"fleetlite-agent: error: {exc}", file=err)
        return 1
    except KeyboardInterrupt:
        print("", file=err)
        return 1


def _generate(backend: Backend, args: argparse.Namespace, stdin: TextIO, out: TextIO,
              err: TextIO) -> int:
    prompt = args.prompt if args.prompt is not None else stdin.read().strip()
    if not prompt:
        print("fleetlite-agent: error: empty prompt: give --prompt or text on stdin", file=err)
        return 2
    reply = Reply()
    for piece in backend.stream(prompt, _params(args), reply):
        if not structured(args):
            out.write(piece)
            out.flush()
    if structured(args):
        emit(args, {"text": reply.text, "stop_reason": reply.stop_reason,
                    "stats": reply.stats}, out)
    else:
        out.write("\n")
    if args.stats:
        _print_stats(reply, err)
    return 0


def _chat(backend: Backend, args: argparse.Namespace, stdin: TextIO, out: TextIO,
          err: TextIO) -> int:
    from fleetlite.sdk.local_client import INPUT_MISMATCH, LocalApiError

    history: list[tuple[str, str]] = []
    interactive = stdin.isatty()
    if interactive:
        print(f"chatting with {args.model}; Ctrl-D ends the conversation", file=err)
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        line = stdin.readline()
        if not line:
            return 0
        message = line.strip()
        if not message:
            continue
        reply = Reply()
        while True:
            prompt = chat_prompt(backend.prompt_template, history[-MAX_CHAT_TURNS:], message)
            try:
                for piece in backend.stream(prompt, _params(args), reply):
                    out.write(piece)
                    out.flush()
                break
            except (LocalApiError, FleetLiteError) as exc:
                too_long = (isinstance(exc, LocalApiError) and exc.code == INPUT_MISMATCH) or (
                    "context holds" in str(exc))
                if not (too_long and history and not reply.text):
                    raise
                history.pop(0)  # the conversation outgrew the context: forget the oldest turn
        out.write("\n")
        if args.stats:
            _print_stats(reply, err)
        history.append((message, reply.text.strip()))
