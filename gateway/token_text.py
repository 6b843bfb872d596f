"""The bytes and text of single tokens, for logprobs in OpenAI's formats.

Decoding one token alone is wrong for two common tokenizer kinds: byte-level BPE
(GPT-2, Llama 3, SmolLM2, Qwen) splits characters over tokens, and SentencePiece marks
a word start with "▁" and stores odd bytes as "<0xNN>" tokens. The raw bytes come from
the vocabulary entry itself; the text is those bytes decoded, U+FFFD where a character
is incomplete.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tandem.core.tokenizer import Tokenizer

BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
SPIECE_SPACE = "\u2581"


def byte_level_alphabet() -> dict[str, int]:
    """The printable stand-in character of each byte in byte-level BPE vocabularies.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are mapped, in
    order, onto code points from 256 up, so that every byte is a visible character.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _decoder_types(model_dir: Path) -> list[str]:
    path = model_dir / "tokenizer.json"
    try:
        decoder = json.loads(path.read_text()).get("decoder") or {}
    except (OSError, ValueError):
        return []
    parts = decoder.get("decoders") or [decoder]
    return [p.get("type", "") for p in parts if isinstance(p, dict)]


class TokenTexts:
    def __init__(self, tokenizer: Tokenizer, model_dir: Path) -> None:
        self._tok = tokenizer
        decoders = _decoder_types(Path(model_dir))
        self._byte_level = "ByteLevel" in decoders
        # Decoding is the tokens' bytes joined, nothing else (no cleanup, no "▁"): then
        # output text can be built from bytes_of alone (detokenizer.ByteTextDecoder).
        self.bytes_are_text = decoders == ["ByteLevel"]
        self._alphabet = byte_level_alphabet() if self._byte_level else {}
        self._cache: dict[int, bytes] = {}
        self._added = tokenizer.added_tokens()
        self._output: dict[int, bytes] = {}

    def bytes_of(self, token_id: int) -> bytes:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._bytes(token_id)
        return cached

    def output_bytes(self, token_id: int) -> bytes:
        """What a token adds to output text when special tokens are skipped."""
        cached = self._output.get(token_id)
        if cached is None:
            added = self._added.get(token_id)
            if added is None:
                cached = self.bytes_of(token_id)
            else:  # stored as its text, or nothing for a special token
                cached = b"" if added[1] else added[0].encode("utf-8")
            self._output[token_id] = cached
        return cached

    def text_of(self, token_id: int) -> str:
        return self.bytes_of(token_id).decode("utf-8", errors="replace")

    def _bytes(self, token_id: int) -> bytes:
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level and all(c in self._alphabet for c in piece):
            return bytes(self._alphabet[c] for c in piece)
        if m := BYTE_TOKEN.match(piece):
            return bytes([int(m.group(1), 16)])
        if SPIECE_SPACE in piece:
            return piece.replace(SPIECE_SPACE, " ").encode("utf-8")
        # Special and added tokens are stored as their text.
        return self._tok.decode([token_id], skip_special_tokens=False).encode("utf-8")
