"""Incremental detokenization and stop strings, one instance per request.

Decoding token by token breaks text in two ways: a multi-byte character split over
tokens decodes to U+FFFD, and tokenizers that mark word starts (SentencePiece's "▁")
drop a leading space when a token is decoded alone. So each step decodes a short window
of already-emitted tokens plus the new ones and emits only what the window's earlier
part did not already produce; text that ends in U+FFFD waits for the next token.

Stop strings are applied to the emitted text: output never goes past one, and a tail
that could be the start of one is held back until the next text decides it.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
PROMPT_CONTEXT_TOKENS = 5  # enough context for a word-start marker to decode right


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Decoder,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        # A prompt given as ids may end inside a character; its bytes would then leak
        # into the first output character, so such context is dropped.
        if context and self._decode(context).endswith(REPLACEMENT_CHAR):
            context = []
        self._ids: list[int] = context
        self._prefix_offset = 0  # window start: tokens before it are done with
        self._read_offset = len(context)  # tokens before it have had their text emitted
        self.num_output_tokens = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_ids: Sequence[int]) -> str:
        """Append new tokens; return the text that is now final."""
        if not token_ids:
            return ""
        self._ids.extend(token_ids)
        self.num_output_tokens += len(token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """At finish: text held back for an incomplete character, as decoded."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if not final and (len(full) <= len(prefix) or full.endswith(REPLACEMENT_CHAR)):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        # Only the window is ever decoded again; drop what is before it.
        if self._prefix_offset > 0:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        # Decoders that clean up spaces can rewrite the window's end, so this is by
        # length, not by prefix match: a rare cosmetic difference, never duplicated text.
        return full[len(prefix) :]


class ByteTextDecoder:
    """IncrementalDetokenizer's job for byte-level BPE vocabularies, whose decoding is
    only the tokens' bytes joined: each token's bytes come from a table, and an
    incremental UTF-8 decoder holds back a character split over tokens. No `decode`
    call per token (two, over a window, in IncrementalDetokenizer)."""

    def __init__(self, token_bytes: Callable[[int], bytes]) -> None:
        self._bytes = token_bytes  # special tokens: b""
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.num_output_tokens = 0

    def add(self, token_ids: Sequence[int]) -> str:
        self.num_output_tokens += len(token_ids)
        token_bytes = self._bytes
        return self._utf8.decode(b"".join([token_bytes(t) for t in token_ids]))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class StopStringMatcher:
    """Truncates text at the first stop string; holds back a possible partial match."""

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = tuple(s for s in stop if s)
        self.active = bool(self._stop)
        self._held = ""
        self.stopped: str | None = None  # the stop string that ended the text

    def feed(self, text: str) -> str:
        """Return the text that is safe to emit; after a match, sets `stopped`."""
        if self.stopped is not None:
            return ""
        if not self._stop:
            return text
        buf = self._held + text
        cut, hit = _first_match(buf, self._stop)
        if hit is not None:
            self.stopped = hit
            self._held = ""
            return buf[:cut]
        keep = _partial_suffix(buf, self._stop)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """At finish: the held-back tail was not a stop string after all."""
        held, self._held = self._held, ""
        return held


def _first_match(buf: str, stops: tuple[str, ...]) -> tuple[int, str | None]:
    best, hit = len(buf), None
    for s in stops:
        i = buf.find(s)
        if i != -1 and i < best:
            best, hit = i, s
    return best, hit


def _partial_suffix(buf: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of buf that is a proper prefix of some stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(buf)), longest, -1):
            if buf.endswith(s[:n]):
                longest = n
                break
    return longest


class TextStream:
    """Token ids in, client text out: detokenize, then apply stop strings."""

    def __init__(
        self,
        tokenizer: Decoder,
        prompt_token_ids: Sequence[int],
        stop: Sequence[str],
        token_bytes: Callable[[int], bytes] | None = None,
    ) -> None:
        """token_bytes: each token's output bytes, where the vocabulary's decoding is
        only those joined (TokenTexts.bytes_are_text): the cheaper ByteTextDecoder."""
        self._detok: IncrementalDetokenizer | ByteTextDecoder = (
            ByteTextDecoder(token_bytes)
            if token_bytes is not None
            else IncrementalDetokenizer(tokenizer, prompt_token_ids)
        )
        self._stops = StopStringMatcher(stop)

    @property
    def stopped(self) -> bool:
        return self._stops.stopped is not None

    @property
    def has_stop_strings(self) -> bool:
        return self._stops.active

    def add(self, token_ids: Sequence[int]) -> str:
        return self._stops.feed(self._detok.add(token_ids))

    def finish(self) -> str:
        """All text still held back, once no more tokens will come."""
        text = self._stops.feed(self._detok.flush())
        return text if self.stopped else text + self._stops.flush()
