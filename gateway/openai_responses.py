"""Outputs into OpenAI's response shapes: whole answers, stream chunks, usage, logprobs.

One builder per HTTP request; choices arrive interleaved (each is its own request to
the workers) and are told apart by index.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

from tandem.gateway.execution import Output
from tandem.gateway.token_text import TokenTexts


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0  # of its prompt, found in the prefix cache
    # completions: the four parallel lists of the legacy logprobs object
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float]] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)
    # chat: one entry per token
    content: list[dict[str, Any]] = field(default_factory=list)
    chars: int = 0  # text emitted so far (for text_offset)


def _top(position: dict[int, float], n: int) -> list[tuple[int, float]]:
    return heapq.nlargest(n, position.items(), key=lambda kv: kv[1]) if n else []


class ResponseBuilder:
    def __init__(
        self,
        kind: str,  # "completion" | "chat"
        response_id: str,
        model: str,
        created: int,
        num_choices: int,
        prompt_lens: list[int],
        texts: TokenTexts,
        top_logprobs: int | None,  # None: no logprobs asked for
    ) -> None:
        self.kind = kind
        self.id = response_id
        self.model = model
        self.created = created
        self.prompt_lens = prompt_lens
        self._texts = texts
        self._top_n = top_logprobs
        self._choices = [_Choice() for _ in range(num_choices)]

    # -- logprobs ----------------------------------------------------------------------
    def _completion_logprobs(self, choice: _Choice, out: Output) -> dict[str, Any]:
        part: dict[str, list] = {
            "tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []
        }  # fmt: skip
        positions = out.logprobs + [{}] * (len(out.token_ids) - len(out.logprobs))
        for token_id, position in zip(out.token_ids, positions, strict=False):
            text = self._texts.text_of(token_id)
            part["tokens"].append(text)
            part["token_logprobs"].append(position.get(token_id))
            part["top_logprobs"].append(
                {self._texts.text_of(t): lp for t, lp in _top(position, self._top_n or 0)}
            )
            part["text_offset"].append(choice.chars)
            choice.chars += len(text)
        for key, values in part.items():
            getattr(choice, key).extend(values)
        return part

    def _entry(self, token_id: int, logprob: float | None) -> dict[str, Any]:
        raw = self._texts.bytes_of(token_id)
        return {
            "token": raw.decode("utf-8", errors="replace"),
            "logprob": logprob if logprob is not None else -9999.0,
            "bytes": list(raw),
        }

    def _chat_logprobs(self, choice: _Choice, out: Output) -> dict[str, Any]:
        content = []
        positions = out.logprobs + [{}] * (len(out.token_ids) - len(out.logprobs))
        for token_id, position in zip(out.token_ids, positions, strict=False):
            entry = self._entry(token_id, position.get(token_id))
            entry["top_logprobs"] = [
                self._entry(t, lp) for t, lp in _top(position, self._top_n or 0)
            ]
            content.append(entry)
        choice.content.extend(content)
        return {"content": content, "refusal": None}

    def _logprobs(self, choice: _Choice, out: Output) -> dict[str, Any] | None:
        if self._top_n is None:
            return None
        if self.kind == "chat":
            return self._chat_logprobs(choice, out)
        return self._completion_logprobs(choice, out)

    # -- accumulating ------------------------------------------------------------------
    def _take(self, index: int, out: Output) -> tuple[_Choice, dict[str, Any] | None]:
        choice = self._choices[index]
        choice.text.append(out.text)
        choice.completion_tokens = out.completion_tokens
        choice.cached_tokens = out.cached_tokens
        if out.finish_reason is not None:
            choice.finish_reason = out.finish_reason
        return choice, self._logprobs(choice, out)

    def add(self, index: int, out: Output) -> None:
        """Non-streaming: keep an output for the final answer."""
        self._take(index, out)

    def usage(self) -> dict[str, Any]:
        prompt = sum(self.prompt_lens)
        completion = sum(c.completion_tokens for c in self._choices)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(c.cached_tokens for c in self._choices)},
        }

    def _envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def response(self) -> dict[str, Any]:
        """Non-streaming: the whole answer."""
        choices = []
        for index, c in enumerate(self._choices):
            text = "".join(c.text)
            if self.kind == "chat":
                logprobs = None
                if self._top_n is not None:
                    logprobs = {"content": c.content, "refusal": None}
                choices.append({
                    "index": index,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                })  # fmt: skip
            else:
                logprobs = None
                if self._top_n is not None:
                    logprobs = {
                        "tokens": c.tokens,
                        "token_logprobs": c.token_logprobs,
                        "top_logprobs": c.top_logprobs,
                        "text_offset": c.text_offset,
                    }
                choices.append({
                    "index": index, "text": text, "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                })  # fmt: skip
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {
            **self._envelope(obj),
            "choices": choices,
            "usage": self.usage(),
            "system_fingerprint": None,
        }

    # -- streaming ---------------------------------------------------------------------
    def _chunk(self, choice: dict[str, Any], include_usage: bool) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        chunk = {**self._envelope(obj), "choices": [choice]}
        if include_usage:
            chunk["usage"] = None
        return chunk

    def opening_chunks(self, include_usage: bool) -> list[dict[str, Any]]:
        """Chat streams start each choice with the assistant role."""
        if self.kind != "chat":
            return []
        return [
            self._chunk(
                {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                },
                include_usage,
            )  # fmt: skip
            for i in range(len(self._choices))
        ]

    def stream_chunk(self, index: int, out: Output, include_usage: bool) -> dict[str, Any] | None:
        """The chunk for one output, or None when it carries nothing to show."""
        _choice, logprobs = self._take(index, out)
        if not out.text and out.finish_reason is None and logprobs is None:
            return None
        if self.kind == "chat":
            delta = {"content": out.text} if out.text else {}
            body = {"index": index, "delta": delta}
        else:
            body = {"index": index, "text": out.text}
        body["logprobs"] = logprobs
        body["finish_reason"] = out.finish_reason
        return self._chunk(body, include_usage)

    def usage_chunk(self) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._envelope(obj), "choices": [], "usage": self.usage()}
