"""Generating text with a small language model in the litert-torch / LiteRT-LM signature convention.

:class:`LmEngine` drives one ``.tflite`` with signatures ``prefill_<N>`` and ``decode`` (checked by
:func:`~fleetlite.sdk.lm_signature.inspect_lm`): it prefills the prompt but its last token, then
decodes from the last prompt token, choosing each next token from the logits and feeding it back,
until a stop id, a stop string, the token limit, the context length or cancellation. The key/value
caches one signature call returns are the next call's inputs as they are: the runtime copies them
in and out, the engine adds no copy. The agent's
:class:`~fleetlite.agent.lm_service.LmService` runs one generation at a time on an engine with a
bounded wait queue.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from fleetlite.sdk.generation import (
    MAX_MAX_TOKENS,
    MAX_STOP_STRING,
    MAX_TEMPERATURE,
    GenerationSpec,
    Sampling,
    check_generation,
)
from fleetlite.sdk.lm_signature import (
    DECODE,
    LmLayout,
    SignatureShapes,
    TensorShape,
    inspect_lm,
    prefill_name,
)
from fleetlite.sdk.runtime.errors import InferenceError, InputMismatchError, ModelRuntimeError
from fleetlite.sdk.runtime.interpreter import (
    Array,
    ModelSource,
    create_interpreter,
    read_model_source,
)
from fleetlite.sdk.runtime.native_log import runtime_log_filtered
from fleetlite.sdk.runtime.sampling import StopMatcher, choose_token
from fleetlite.sdk.runtime.tokenizer import IncrementalDecoder, Tokenizer

STOP_TOKEN = "stop_token"
STOP_STRING = "stop_string"
MAX_TOKENS = "max_tokens"
CONTEXT_FULL = "context_full"
CANCELLED = "cancelled"

MASKED = float(np.finfo(np.float32).min)  # additive mask value of a hidden position
_SAMPLING = Sampling()


class BusyError(ModelRuntimeError):
    """The language model is generating for others and its wait queue is full: retry later."""


class GenerationInputError(InputMismatchError):
    """A prompt or generation parameter the model cannot take (too long, out of range)."""


class MemoryBudgetError(ModelRuntimeError):
    """The model and its caches would need more memory than the device class allows."""


@dataclass(frozen=True)
class GenerateParams:
    """Sampling and stop conditions of one generation (defaults: the release's sampling).

    ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 switch those filters off; ``seed``
    makes sampling reproducible (``None``: a fresh seed). ``stop_ids`` and ``stop_strings`` add to
    the release's own stop conditions.
    """

    temperature: float = _SAMPLING.temperature
    top_k: int = _SAMPLING.top_k
    top_p: float = _SAMPLING.top_p
    seed: Optional[int] = None
    max_tokens: int = _SAMPLING.max_tokens
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            problems.append(f"temperature must be in [0, {MAX_TEMPERATURE:g}]")
        if self.top_k < 0:
            problems.append("top_k must be >= 0 (0: no top-k filter)")
        if not 0.0 < self.top_p <= 1.0:
            problems.append("top_p must be in (0, 1] (1: no nucleus filter)")
        if not 1 <= self.max_tokens <= MAX_MAX_TOKENS:
            problems.append(f"max_tokens must be in [1, {MAX_MAX_TOKENS}]")
        if self.seed is not None and self.seed < 0:
            problems.append("seed must be >= 0")
        if any(token < 0 for token in self.stop_ids):
            problems.append("stop_ids must be token ids >= 0")
        if any(not 1 <= len(text) <= MAX_STOP_STRING for text in self.stop_strings):
            problems.append(f"stop_strings must be 1-{MAX_STOP_STRING} characters each")
        if problems:
            raise GenerationInputError("invalid generation parameters: " + "; ".join(problems))

    @classmethod
    def from_sampling(cls, sampling: Sampling) -> GenerateParams:
        """The parameters a release's default ``sampling`` stands for."""
        return cls(
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
        )


@dataclass
class GenerationStats:
    """What one generation cost. Times in ms; ``decode_ms`` has one entry per decode call (the
    first one produced the first token, so it is part of ``time_to_first_token_ms``)."""

    prompt_tokens: int
    generated_tokens: int = 0
    queued_ms: float = 0.0
    time_to_first_token_ms: Optional[float] = None
    prefill_ms: float = 0.0
    decode_ms: list[float] = field(default_factory=list)
    stop_reason: Optional[str] = None

    @property
    def prefill_tokens_per_s(self) -> Optional[float]:
        """Prompt tokens through the prefill signatures (all but the last) per second."""
        prefilled = self.prompt_tokens - 1
        return prefilled / self.prefill_ms * 1000.0 if prefilled and self.prefill_ms else None

    @property
    def decode_tokens_per_s(self) -> Optional[float]:
        total = sum(self.decode_ms)
        return len(self.decode_ms) / total * 1000.0 if total else None


class Generation(Iterator[int]):
    """The token ids of one generation as they are produced, and its :attr:`stats`.

    Iterate it to the end or :meth:`close` it (or use it in a ``with`` block): until then it holds
    the engine. To stop it from another thread, set the ``cancel`` event it was started with.
    """

    def __init__(self, tokens: Generator[int, None, None], stats: GenerationStats) -> None:
        self._tokens = tokens
        self.stats = stats
        self._on_close: list[Callable[[], None]] = []

    def __next__(self) -> int:
        try:
            return next(self._tokens)
        except BaseException:
            self.close()
            raise

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once when the generation ends, is closed or is dropped."""
        self._on_close.append(callback)

    def close(self) -> None:
        self._tokens.close()
        callbacks, self._on_close = self._on_close, []
        for callback in callbacks:
            callback()

    def __enter__(self) -> Generation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


@dataclass(frozen=True)
class TextChunk:
    """A piece of generated text, and how many tokens the generation has produced so far."""

    text: str
    tokens: int


class TextStream(Iterator[TextChunk]):
    """Text of a :class:`Generation` in chunks that are safe to show: whole characters, never a
    stop string nor the start of one. Its :attr:`stats` are the generation's."""

    def __init__(
        self, generation: Generation, tokenizer: Tokenizer, stop_strings: Sequence[str]
    ) -> None:
        self.generation = generation
        self.stats = generation.stats
        self._chunks = self._run(IncrementalDecoder(tokenizer), StopMatcher(stop_strings))

    def __next__(self) -> TextChunk:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()
        self.generation.close()

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(
        self, decoder: IncrementalDecoder, matcher: StopMatcher
    ) -> Generator[TextChunk, None, None]:
        with self.generation:
            for token in self.generation:
                text = matcher.feed(decoder.push(token))
                if text:
                    yield TextChunk(text, self.stats.generated_tokens)
                if matcher.stopped:
                    self.stats.stop_reason = STOP_STRING
                    return
        text = matcher.feed(decoder.flush())
        if matcher.stopped:
            self.stats.stop_reason = STOP_STRING
        else:
            text += matcher.flush()
        if text:
            yield TextChunk(text, self.stats.generated_tokens)


class PrefillStep(NamedTuple):
    """One signature call of a prefill: ``filled`` prompt tokens from ``start``, zero-padded to
    the signature's length ``size`` (``decode`` takes one token)."""

    signature: str
    start: int
    size: int
    filled: int


def plan_prefill(count: int, lengths: Sequence[int], context_length: int) -> list[PrefillStep]:
    """The calls that write ``count`` tokens into the cache, from position 0.

    Each call takes the smallest prefill length that holds the tokens left, else the longest;
    a call never reaches past the context (the cache write would be clamped and overwrite
    earlier positions), so tokens no prefill length fits go one by one through ``decode``.
    """
    steps: list[PrefillStep] = []
    start = 0
    while start < count:
        left = count - start
        usable = sorted(size for size in lengths if start + size <= context_length)
        if not usable:
            steps.extend(PrefillStep(DECODE, p, 1, 1) for p in range(start, count))
            break
        size = next((size for size in usable if size >= left), usable[-1])
        steps.append(PrefillStep(prefill_name(size), start, size, min(size, left)))
        start += min(size, left)
    return steps


def cache_bytes(layout: LmLayout) -> int:
    """Bytes of one full set of key and value caches (float32)."""
    return 2 * layout.num_layers * layout.context_length * layout.num_heads * layout.head_dim * 4


def estimate_memory_bytes(
    model_bytes: int, layout: LmLayout, prefill_lengths: Optional[Sequence[int]] = None
) -> int:
    """Memory an engine needs beyond the Python process: the model, caches and logits.

    A set of caches is counted for each place one lives at the same time: the input and the
    output tensors of decode and of each prefill used (``prefill_lengths``, default all the
    model has; each signature is a subgraph with its own arena), and on the Python side the zero
    caches that start a generation, the current caches and the next call's outputs. Not counted:
    activations, and weights a CPU delegate repacks (XNNPACK keeps its own copy of float
    weights), so the measured peak can be higher (tools/bench/bench_generate.py measures it).
    """
    used = layout.prefill_lengths if prefill_lengths is None else prefill_lengths
    signatures = 1 + len(used)
    return model_bytes + (2 * signatures + 3) * cache_bytes(layout) + 4 * layout.vocab_size


def read_signatures(interpreter: Any) -> tuple[SignatureShapes, dict[str, Any]]:
    """Every signature's input and output shapes, and its runner (create runners once: reuse)."""
    shapes: dict[str, tuple[dict[str, TensorShape], dict[str, TensorShape]]] = {}
    runners: dict[str, Any] = {}
    for name in interpreter.get_signature_list():
        runner = interpreter.get_signature_runner(name)
        runners[name] = runner
        shapes[name] = (
            _tensor_shapes(runner.get_input_details()),
            _tensor_shapes(runner.get_output_details()),
        )
    return shapes, runners


def _tensor_shapes(details: dict[str, dict[str, Any]]) -> dict[str, TensorShape]:
    return {
        name: TensorShape(tuple(int(d) for d in detail["shape"]), np.dtype(detail["dtype"]).name)
        for name, detail in details.items()
    }


def causal_mask(context_length: int) -> Array:
    """The [T, T] additive causal mask (row p: 0 up to column p, :data:`MASKED` after), as a
    read-only view over 2T-1 floats: a row is a contiguous view, no mask is built per step."""
    line = np.zeros(2 * context_length - 1, dtype=np.float32)
    line[context_length:] = MASKED
    rows: Array = sliding_window_view(line, context_length)[::-1]
    return rows


class LmEngine:
    """One generative LM ``.tflite``, loaded once, generating one sequence at a time.

    ``spec`` (the release's generation metadata) supplies the cache layout, stop ids, prompt
    template and default sampling, and is checked against the model; ``tokenizer`` enables
    :meth:`stream`. ``prefill_lengths`` picks the prefill signatures to use (default: all the
    model has); each one used costs two sets of caches in its arena, and with ``()`` prompts go
    through ``decode`` token by token. ``memory_budget_mib`` (the device class's budget) is
    checked before the interpreter allocates anything. Raises
    :class:`~fleetlite.sdk.errors.LmFormatError` when the model, spec and tokenizer disagree,
    :class:`MemoryBudgetError`, and the runtime's load errors.
    """

    def __init__(
        self,
        model: ModelSource,
        *,
        spec: Optional[GenerationSpec] = None,
        tokenizer: Optional[Tokenizer] = None,
        cache_layout: Optional[str] = None,
        prefill_lengths: Optional[Sequence[int]] = None,
        num_threads: int = 1,
        backend: Optional[str] = None,
        memory_budget_mib: Optional[float] = None,
    ) -> None:
        self._content, self.origin = read_model_source(model)
        self.backend, self._interpreter = create_interpreter(
            self._content, self.origin, num_threads=num_threads, backend=backend
        )
        try:
            # tflite-runtime 2.14 applies its default delegate (XNNPACK) only here: signature
            # runners alone would run the reference kernels at about half the speed
            with runtime_log_filtered():
                self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise InferenceError(
                f"{self.origin}: the runtime cannot allocate the model's tensors ({exc}); the "
                "model is broken or needs a newer runtime") from exc
        signatures, runners = read_signatures(self._interpreter)
        self.signatures: SignatureShapes = signatures
        layout_hint = cache_layout or (spec.cache_layout if spec else None)
        self.layout = inspect_lm(signatures, layout_hint)
        if spec is not None:
            check_generation(spec, self.layout, tokenizer.vocab_size if tokenizer else None)
        self.spec = spec
        self.tokenizer = tokenizer
        self.prefill_lengths = self._choose_prefills(prefill_lengths)
        self.memory_estimate = estimate_memory_bytes(
            len(self._content), self.layout, self.prefill_lengths
        )
        if memory_budget_mib is not None and self.memory_estimate > memory_budget_mib * 2**20:
            raise MemoryBudgetError(
                f"{self.origin}: the model and its key/value caches need about "
                f"{self.memory_estimate / 2**20:.1f} MiB, more than the memory budget of "
                f"{memory_budget_mib:g} MiB; choose a smaller variant (int8, a shorter context) "
                "for this device class"
            )
        decode_inputs = signatures[DECODE][0]
        self._cache_names = tuple(name for name in decode_inputs if name.startswith("kv_cache_"))
        self._zero_caches = {
            name: np.zeros(decode_inputs[name].shape, dtype=np.float32)
            for name in self._cache_names
        }
        self._runners = runners
        self._decode = runners[DECODE]
        self._mask = causal_mask(self.layout.context_length) if self.layout.has_mask else None
        self._stop_ids = frozenset(spec.stop_ids) if spec else frozenset()
        self._in_use = threading.Lock()

    @property
    def interpreter(self) -> Any:
        """The runtime's interpreter (op counts and quantization for profiles; do not invoke it
        while the engine generates)."""
        return self._interpreter

    @property
    def model_size(self) -> int:
        return len(self._content)

    def default_params(self) -> GenerateParams:
        """The release's default sampling, or greedy with 64 tokens without a spec."""
        return GenerateParams.from_sampling(self.spec.sampling if self.spec else _SAMPLING)

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of ``prompt`` in the release's template, after its BOS id if it has one."""
        spec, tokenizer = self._text_parts()
        bos = [spec.bos_id] if spec.bos_id is not None else []
        return bos + tokenizer.encode(spec.render_prompt(prompt))

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: Optional[GenerateParams] = None,
        *,
        cancel: Optional[threading.Event] = None,
    ) -> Generation:
        """Token ids generated after ``prompt_ids``, streamed as they are chosen.

        The prompt is checked now (:class:`GenerationInputError` when empty, out of the
        vocabulary or longer than the context); the model runs as the result is iterated. A stop
        id ends the generation without being yielded. Raises :class:`BusyError` when another
        generation is running on this engine (the agent's ``LmService`` queues instead).
        """
        params = params or self.default_params()
        prompt = [int(token) for token in prompt_ids]
        self._check_prompt(prompt)
        stats = GenerationStats(prompt_tokens=len(prompt))
        started = time.perf_counter()
        return Generation(self._run(prompt, params, cancel, stats, started), stats)

    def stream(
        self,
        prompt: str,
        params: Optional[GenerateParams] = None,
        *,
        cancel: Optional[threading.Event] = None,
    ) -> TextStream:
        """The reply to ``prompt`` (rendered with the release's template) as text chunks."""
        return self.text_stream(
            self.generate(self.encode_prompt(prompt), params, cancel=cancel), params
        )

    def text_stream(
        self, generation: Generation, params: Optional[GenerateParams] = None
    ) -> TextStream:
        """Text of ``generation``, stopping at the release's and ``params``' stop strings."""
        spec, tokenizer = self._text_parts()
        extra = params.stop_strings if params else ()
        return TextStream(generation, tokenizer, (*spec.stop_strings, *extra))

    def greedy_logits(self, prompt_ids: Sequence[int], count: int) -> Iterator[Array]:
        """The logits of ``count`` decode steps after ``prompt_ids``, feeding back each step's
        argmax and ignoring stop ids (fewer at the end of the context): what smoke vectors and
        profiles compare. Holds the engine like :meth:`generate`."""
        prompt = [int(token) for token in prompt_ids]
        self._check_prompt(prompt)
        if not self._in_use.acquire(blocking=False):
            raise BusyError(f"{self.origin}: another generation is running on this engine")
        try:
            stats = GenerationStats(prompt_tokens=len(prompt))
            caches = self._prefill(prompt[:-1], stats)
            token, position = prompt[-1], len(prompt) - 1
            for _ in range(count):
                if position >= self.layout.context_length:
                    return
                logits, caches = self._decode_step(token, position, caches)
                yield logits
                token, position = int(np.argmax(logits)), position + 1
        finally:
            self._in_use.release()

    # -- the loop ------------------------------------------------------------------------------

    def _run(
        self,
        prompt: list[int],
        params: GenerateParams,
        cancel: Optional[threading.Event],
        stats: GenerationStats,
        started: float,
    ) -> Generator[int, None, None]:
        if not self._in_use.acquire(blocking=False):
            raise BusyError(
                f"{self.origin}: another generation is running on this engine; finish or close "
                "it first, or serve the engine through LmService, which queues callers"
            )
        try:
            clock = time.perf_counter
            rng = np.random.default_rng(params.seed)
            stop_ids = self._stop_ids | frozenset(params.stop_ids)
            caches = self._prefill(prompt[:-1], stats)
            token, position = prompt[-1], len(prompt) - 1
            while True:
                if cancel is not None and cancel.is_set():
                    stats.stop_reason = CANCELLED
                    return
                step_start = clock()
                logits, caches = self._decode_step(token, position, caches)
                token = choose_token(
                    logits,
                    temperature=params.temperature,
                    top_k=params.top_k,
                    top_p=params.top_p,
                    rng=rng,
                )
                now = clock()
                stats.decode_ms.append((now - step_start) * 1000.0)
                if token in stop_ids:
                    stats.stop_reason = STOP_TOKEN
                    return
                if stats.time_to_first_token_ms is None:
                    stats.time_to_first_token_ms = (now - started) * 1000.0
                stats.generated_tokens += 1
                yield token
                position += 1
                if stats.generated_tokens >= params.max_tokens:
                    stats.stop_reason = MAX_TOKENS
                    return
                if position >= self.layout.context_length:
                    stats.stop_reason = CONTEXT_FULL
                    return
        finally:
            self._in_use.release()

    def _prefill(self, ids: list[int], stats: GenerationStats) -> dict[str, Array]:
        start = time.perf_counter()
        caches = self._zero_caches  # only read: runners copy their inputs
        for step in plan_prefill(len(ids), self.prefill_lengths, self.layout.context_length):
            tokens = np.zeros((1, step.size), dtype=np.int32)
            tokens[0, : step.filled] = ids[step.start : step.start + step.filled]
            feeds = {
                **caches,
                "tokens": tokens,
                "input_pos": np.arange(step.start, step.start + step.size, dtype=np.int32),
            }
            if self._mask is not None:
                rows = self._mask[step.start : step.start + step.size]
                feeds["mask"] = np.ascontiguousarray(rows).reshape(1, 1, step.size, -1)
            outputs = self._call(self._runners[step.signature], feeds)
            outputs.pop("logits", None)  # decode steps of a prefill: only their caches count
            caches = outputs
        stats.prefill_ms = (time.perf_counter() - start) * 1000.0
        return caches

    def _decode_step(
        self, token: int, position: int, caches: dict[str, Array]
    ) -> tuple[Array, dict[str, Array]]:
        feeds = {
            **caches,
            "tokens": np.array([[token]], dtype=np.int32),
            "input_pos": np.array([position], dtype=np.int32),
        }
        if self._mask is not None:
            feeds["mask"] = self._mask[position].reshape(1, 1, 1, -1)
        outputs = self._call(self._decode, feeds)
        return outputs.pop("logits"), outputs

    def _call(self, runner: Any, feeds: dict[str, Array]) -> dict[str, Array]:
        try:
            outputs: dict[str, Array] = runner(**feeds)
        except (ValueError, RuntimeError) as exc:
            raise InferenceError(
                f"{self.origin}: the language model failed while generating "
                f"({str(exc).strip().splitlines()[0]}); report this with the model's release"
            ) from exc
        return outputs

    def _choose_prefills(self, wanted: Optional[Sequence[int]]) -> tuple[int, ...]:
        if wanted is None:
            return self.layout.prefill_lengths
        unknown = sorted(set(wanted) - set(self.layout.prefill_lengths))
        if unknown:
            raise ModelRuntimeError(
                f"{self.origin}: the model has no prefill signature of length {unknown[0]}; "
                f"choose prefill lengths among {list(self.layout.prefill_lengths)}"
            )
        return tuple(sorted(set(wanted)))

    def _check_prompt(self, prompt: list[int]) -> None:
        vocab, context = self.layout.vocab_size, self.layout.context_length
        if not prompt:
            raise GenerationInputError(
                "the prompt has no tokens; pass at least one (usually the BOS id)"
            )
        outside = next((token for token in prompt if not 0 <= token < vocab), None)
        if outside is not None:
            raise GenerationInputError(
                f"prompt token id {outside} is outside the model's vocabulary [0, {vocab}); "
                "encode the prompt with the release's tokenizer"
            )
        if len(prompt) > context:
            raise GenerationInputError(
                f"the prompt is {len(prompt)} tokens but the model's context holds {context} "
                "(prompt and reply together); shorten the prompt"
            )

    def _text_parts(self) -> tuple[GenerationSpec, Tokenizer]:
        if self.spec is None or self.tokenizer is None:
            raise ModelRuntimeError(
                f"{self.origin}: text generation needs the release's generation metadata and "
                "tokenizer; load the engine with spec= and tokenizer=, or call generate() with "
                "token ids"
            )
        return self.spec, self.tokenizer
