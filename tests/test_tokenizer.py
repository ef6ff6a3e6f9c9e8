"""Tokenizers of language models: loading with caps and clear errors, and streaming detokenization
that gives the same text as decoding all ids at once."""

from __future__ import annotations

import io
import random
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetlite.sdk.runtime.tokenizer import (
    MAX_TOKENIZER_BYTES,
    HfTokenizer,
    IncrementalDecoder,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
)

WORDS = ("turn", "off", "the", "kitchen", "lights", "please", "set", "heating", "to", "degrees",
         "bedroom", "now", "café", "naïve", "déjà", "vu", "日本", "hello", "world")
TEXTS = [
    "turn off the kitchen lights",
    "  set   heating to 21 degrees ",
    "café naïve déjà vu",
    "unseen: 🙂 Ωmega ünïcödé",  # characters outside the vocabulary: byte-fallback pieces
    "",
]


def corpus() -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(2000)]


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 300-piece BPE SentencePiece model with byte fallback, trained in 0.1 s."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=model, vocab_size=300, model_type="bpe",
        byte_fallback=True, character_coverage=0.99, minloglevel=2,
    )
    path = tmp_path_factory.mktemp("spm") / "tok.model"
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer.json (GPT-2 style), trained with the tokenizers package."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return path


def streamed(tokenizer: Tokenizer, ids: list[int]) -> str:
    decoder = IncrementalDecoder(tokenizer)
    return "".join(decoder.push(token) for token in ids) + decoder.flush()


# -- SentencePiece -------------------------------------------------------------------------------


def test_sentencepiece_round_trip_without_bos(spm_path: Path) -> None:
    tok = load_tokenizer(spm_path, "sentencepiece")
    assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == 300
    ids = tok.encode("turn off the lights")
    assert ids and 1 not in ids  # no BOS: the engine adds the release's bos_id itself
    assert tok.decode(ids) == "turn off the lights"
    assert tok.decode([3 + 0xF0, 3 + 0x9F, 3 + 0x99, 3 + 0x82]) == "🙂"  # byte-fallback pieces


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_decoding_all_at_once(spm_path: Path, text: str) -> None:
    tok = SentencePieceTokenizer(spm_path)
    ids = tok.encode(text)
    assert streamed(tok, ids) == tok.decode(ids)


def test_a_split_character_is_held_until_complete(spm_path: Path) -> None:
    tok = SentencePieceTokenizer(spm_path)
    decoder = IncrementalDecoder(tok)
    word = tok.encode("hello")
    assert decoder.push(word[0]) != ""
    emoji = [3 + 0xF0, 3 + 0x9F, 3 + 0x99, 3 + 0x82]
    assert [decoder.push(b) for b in emoji] == ["", "", "", "🙂"]
    assert decoder.push(3 + 0xC3) == ""  # the first byte of a 2-byte character, never finished
    assert decoder.flush() == "\ufffd"


@settings(derandomize=True, deadline=None, max_examples=300)
@given(ids=st.lists(st.one_of(st.integers(0, 299), st.integers(3, 3 + 255)), max_size=24))
def test_any_id_sequence_streams_to_the_same_text(spm_path: Path, ids: list[int]) -> None:
    tok = SentencePieceTokenizer(spm_path)  # ids include controls (0-2) and raw bytes (3-258)
    assert streamed(tok, ids) == tok.decode(ids)


def test_an_id_outside_the_vocabulary_is_a_clear_error(spm_path: Path) -> None:
    tok = SentencePieceTokenizer(spm_path)
    with pytest.raises(TokenizerError, match="token id 300 is outside the tokenizer's vocab"):
        tok.decode([5, 300])


# -- refusing bad files ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "match"),
    [(b"", "no pieces"), (b"\x0a\xff\xff garbage", "not a valid SentencePiece model")],
    ids=["empty", "garbage"],
)
def test_a_bad_sentencepiece_file_is_a_tokenizer_error(
    tmp_path: Path, content: bytes, match: str
) -> None:
    path = tmp_path / "bad.model"
    path.write_bytes(content)
    with pytest.raises(TokenizerError, match=match):
        SentencePieceTokenizer(path)


def test_an_oversized_tokenizer_file_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "huge.model"
    with path.open("wb") as handle:  # sparse: takes no disk space
        handle.truncate(MAX_TOKENIZER_BYTES + 1)
    with pytest.raises(TokenizerError, match="larger than 16 MiB"):
        SentencePieceTokenizer(path)


def test_a_missing_tokenizer_file_is_a_tokenizer_error(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="cannot read the tokenizer file"):
        load_tokenizer(tmp_path / "absent.model", "sentencepiece")


def test_an_unknown_tokenizer_kind_names_the_known_ones(spm_path: Path) -> None:
    with pytest.raises(TokenizerError, match="sentencepiece, hf_tokenizers"):
        load_tokenizer(spm_path, "wordpiece")


# -- Hugging Face tokenizer.json -----------------------------------------------------------------


def test_without_the_tokenizers_package_the_error_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import fails as if not installed
    with pytest.raises(TokenizerError, match=r"pip install 'fleetlite\[hf\]'"):
        HfTokenizer(tmp_path / "tokenizer.json")


@pytest.mark.parametrize("text", TEXTS)
def test_hf_round_trip_and_streaming(hf_path: Path, text: str) -> None:
    tok = load_tokenizer(hf_path, "hf_tokenizers")
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert streamed(tok, ids) == text


@settings(derandomize=True, deadline=None, max_examples=200)
@given(draws=st.lists(st.integers(0, 2**16), max_size=24))
def test_hf_any_id_sequence_streams_to_the_same_text(hf_path: Path, draws: list[int]) -> None:
    tok = HfTokenizer(hf_path)
    ids = [draw % tok.vocab_size for draw in draws]
    assert streamed(tok, ids) == tok.decode(ids)


def test_a_bad_tokenizer_json_is_a_tokenizer_error(hf_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text('{"model": "not a model"}')
    with pytest.raises(TokenizerError, match=r"not a valid Hugging Face tokenizer\.json"):
        HfTokenizer(path)
    tok = HfTokenizer(hf_path)
    with pytest.raises(TokenizerError, match="outside the tokenizer's vocabulary"):
        tok.decode([tok.vocab_size])
