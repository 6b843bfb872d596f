"""Parsing an HTTP request's JSON body on the event loop, in bounded time.

json.loads and the validation after it run on the gateway's event loop and hold the GIL
(a thread would not help): while they run, no other stream gets a token out. Their cost
is per JSON value, and an array or object costs several times a number or string; with
the cyclic GC running meanwhile, a 4 MiB body of small objects took two seconds. So
before parsing, the raw body's structure is counted (bytes.count: memory speed):

- `[` and `{` bound the arrays and objects it can make: at most MAX_JSON_CONTAINERS;
- `,` bounds the values in them: at most MAX_JSON_VALUES.

Brackets and commas inside strings count too, so the bounds are conservative: they sit
well above what a request within the gateway's caps needs (2048 messages, 262,144 token
ids). A body over them is refused with 413 before it is parsed; one within them is
parsed with the cyclic GC paused (the parse makes no cycles, and collections triggered
by its allocations scanned the whole heap). Only a body that may hold a lone surrogate
is walked for one afterwards. Together with the byte limit
(`max_receive_message_bytes`) and the model's count checks (gateway.openai_requests),
no request body holds the loop for more than a bounded, small time.
"""

from __future__ import annotations

import gc
import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute

from tandem.gateway.openai_requests import MAX_CHAT_MESSAGES, MAX_PROMPT_TOKEN_IDS, check_unicode

# A chat message with a few content parts is a handful of objects; tools' schemas and
# the rest of a request fit in what is left.
MAX_JSON_CONTAINERS = 32 * MAX_CHAT_MESSAGES  # 65,536: also room for code prompts
MAX_JSON_VALUES = MAX_PROMPT_TOKEN_IDS + 8 * MAX_CHAT_MESSAGES
# json.loads decodes bytes with "surrogatepass": a lone surrogate comes from an escape
# (\ud800) or from its UTF-8-style bytes. Only a body with either is walked for one.
_RAW_SURROGATE = re.compile(rb"\xed[\xa0-\xbf]")


def check_json_structure(body: bytes) -> None:
    """413 if `body` may hold more arrays and objects, or values, than a request needs."""
    containers = body.count(b"[") + body.count(b"{")
    if containers > MAX_JSON_CONTAINERS:
        raise HTTPException(413, f"request body has more than {MAX_JSON_CONTAINERS} JSON "
                                 "arrays and objects ('[' and '{' counted)")  # fmt: skip
    if body.count(b",") >= MAX_JSON_VALUES:
        raise HTTPException(413, f"request body has more than {MAX_JSON_VALUES} JSON values "
                                 "(',' counted)")  # fmt: skip


def parse_json(body: bytes) -> Any:
    check_json_structure(body)
    paused = gc.isenabled()
    gc.disable()
    try:
        data = json.loads(body)
    finally:
        if paused:
            gc.enable()
    if b"\\ud" in body or b"\\uD" in body or _RAW_SURROGATE.search(body):
        try:
            check_unicode(data)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
    return data


class BoundedJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class BoundedJsonRoute(APIRoute):
    """An APIRoute whose JSON body goes through parse_json."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def bounded(request: Request) -> Response:
            return await handler(BoundedJsonRequest(request.scope, request.receive))

        return bounded
