"""Incremental detokenization and stop strings, against the real SmolLM2 tokenizer."""

from __future__ import annotations

import random

import pytest

from tandem.core.tokenizer import Tokenizer
from tandem.gateway.detokenizer import (
    ByteTextDecoder,
    IncrementalDetokenizer,
    StopStringMatcher,
    TextStream,
)
from tandem.gateway.token_text import TokenTexts

TEXTS = [
    "plain ascii, nothing special",
    "世界你好，这是一个测试。",  # CJK: three bytes a character
    "emoji 🙂🚀🎉 and flags 🇫🇷🇯🇵",  # four bytes, and pairs of code points
    "naïve café — résumé ½ ∑ ≠ ∞",
    "family 👨‍👩‍👧‍👦 joined by zero-width joiners",
    "mixed: 日本語 text 🙂 with ascii ✓ and more 中文",
]


def stream_pieces(tokenizer: Tokenizer, ids: list[int], chunks: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer)
    pieces, i = [], 0
    for n in chunks:
        pieces.append(detok.add(ids[i : i + n]))
        i += n
    pieces.append(detok.flush())
    return pieces


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time_never_breaks_characters(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = stream_pieces(tokenizer, ids, [1] * len(ids))
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids) == text


def test_split_characters_are_held_until_complete(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1  # the test means something only if the emoji is split
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.add([t]) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1:]) == "🙂"


@pytest.mark.parametrize("seed", range(5))
def test_random_chunking_concatenates_to_full_decode(tokenizer: Tokenizer, seed: int) -> None:
    rng = random.Random(seed)
    ids = tokenizer.encode(" ".join(TEXTS), add_special_tokens=False)
    chunks = []
    while sum(chunks) < len(ids):
        chunks.append(rng.randint(1, 4))
    pieces = stream_pieces(tokenizer, ids, chunks)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids)


def test_prompt_context_does_not_leak_into_output(tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode("The capital of France is", add_special_tokens=False)
    output = tokenizer.encode(" Paris, 巴黎 🙂.", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids=prompt)
    text = "".join(detok.add([t]) for t in output) + detok.flush()
    assert text == tokenizer.decode(output)


def test_prompt_ending_inside_a_character_is_not_used_as_context(tokenizer: Tokenizer) -> None:
    emoji = tokenizer.encode("🙂", add_special_tokens=False)
    output = tokenizer.encode(" ok", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids=emoji[:-1])
    assert "".join(detok.add([t]) for t in output) + detok.flush() == " ok"


def test_incomplete_character_at_finish_is_flushed_as_decoded(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("ok 🙂", add_special_tokens=False)[:-1]  # cut inside the emoji
    detok = IncrementalDetokenizer(tokenizer)
    streamed = "".join(detok.add([t]) for t in ids)
    assert "\ufffd" not in streamed
    assert streamed + detok.flush() == tokenizer.decode(ids)


def test_special_tokens_are_skipped(tokenizer: Tokenizer) -> None:
    eos = next(iter(tokenizer.eos_token_ids))
    ids = tokenizer.encode("done", add_special_tokens=False) + [eos]
    detok = IncrementalDetokenizer(tokenizer)
    assert "".join(detok.add([t]) for t in ids) + detok.flush() == "done"
    assert detok.num_output_tokens == len(ids)


def test_decode_window_stays_small(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(" ".join(TEXTS) * 20, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    for t in ids:
        detok.add([t])
    # Decoding cost per token must not grow with the output length.
    assert len(detok._ids) < 16


# -- stop strings -----------------------------------------------------------------------
def test_stop_string_inside_one_piece() -> None:
    m = StopStringMatcher(["STOP"])
    assert m.feed("hello STOP world") == "hello "
    assert m.stopped == "STOP"
    assert m.feed("more") == ""


def test_stop_string_spanning_pieces_is_never_emitted() -> None:
    m = StopStringMatcher(["<end>"])
    out = [m.feed("abc<e"), m.feed("n"), m.feed("d>tail")]
    assert out == ["abc", "", ""]
    assert m.stopped == "<end>"


def test_partial_match_is_released_when_it_diverges() -> None:
    m = StopStringMatcher(["<end>"])
    assert m.feed("x <en") == "x "
    assert m.feed("ter") == "<enter"
    assert m.stopped is None


def test_held_tail_is_flushed_at_finish() -> None:
    m = StopStringMatcher(["###"])
    assert m.feed("answer ##") == "answer "
    assert m.flush() == "##"
    assert m.stopped is None


def test_earliest_of_several_stop_strings_wins() -> None:
    m = StopStringMatcher(["world", "lo w", "zzz"])
    assert m.feed("hello world") == "hel"
    assert m.stopped == "lo w"


def test_no_stop_strings_passes_text_through() -> None:
    m = StopStringMatcher([])
    assert m.feed("anything ###") == "anything ###"
    assert m.flush() == ""


def test_text_stream_stop_string_across_token_deltas(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("Step one. The End. Never shown.", add_special_tokens=False)
    stream = TextStream(tokenizer, [], stop=["The End"])
    pieces = []
    for t in ids:
        pieces.append(stream.add([t]))
        if stream.stopped:
            break
    assert "".join(pieces) == "Step one. "
    assert stream.stopped
    assert stream.finish() == ""


def test_text_stream_flushes_held_text_at_finish(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("value: 42 <", add_special_tokens=False)
    stream = TextStream(tokenizer, [], stop=["<|stop|>"])
    streamed = "".join(stream.add([t]) for t in ids)
    assert streamed == "value: 42 "  # "<" might begin the stop string
    assert streamed + stream.finish() == "value: 42 <"
    assert not stream.stopped


@pytest.fixture(scope="module")
def texts(tokenizer: Tokenizer, model_dir) -> TokenTexts:
    return TokenTexts(tokenizer, model_dir)


def byte_pieces(texts: TokenTexts, ids: list[int], chunks: list[int]) -> list[str]:
    decoder = ByteTextDecoder(texts.output_bytes)
    pieces, i = [], 0
    for n in chunks:
        pieces.append(decoder.add(ids[i : i + n]))
        i += n
    return [*pieces, decoder.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_decoder_streams_text_whole(texts: TokenTexts, tokenizer: Tokenizer, text: str):
    assert texts.bytes_are_text  # SmolLM2 is byte-level BPE
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = byte_pieces(texts, ids, [1] * len(ids))
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


@pytest.mark.parametrize("seed", range(20))
def test_byte_decoder_equals_the_tokenizer_on_any_ids(
    texts: TokenTexts, tokenizer: Tokenizer, seed: int
) -> None:
    """Random ids (broken characters, special and added tokens included), in random
    chunks: the same text as decoding them all at once, skipping special tokens."""
    rng = random.Random(seed)
    ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 60))]
    ids += rng.sample(sorted(tokenizer.added_tokens()), 3)
    rng.shuffle(ids)
    chunks, left = [], len(ids)
    while left:
        chunks.append(min(left, rng.randrange(1, 5)))
        left -= chunks[-1]
    assert "".join(byte_pieces(texts, ids, chunks)) == tokenizer.decode(ids)
