"""Several requests for one HTTP call (n > 1, or a batch of prompts), as one stream.

Each choice is its own request to the workers, run by its own task; their outputs come
out interleaved, tagged with the choice's index. The first error ends the whole call;
leaving the block (done, error, client gone) cancels every choice still running, and
each cancelled choice publishes its abort.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from tandem.gateway.execution import Executor, Output
from tandem.gateway.openai_requests import ChoiceSpec
from tandem.gateway.reply_router import Mailbox

_DONE = object()


class Choices:
    def __init__(
        self,
        executor: Executor,
        specs: Sequence[ChoiceSpec],
        api: str,
        arrival: float,
        timeout_s: float | None = None,
    ) -> None:
        self._ex = executor
        self._specs = specs
        self._api = api
        self._arrival = arrival
        self._timeout_s = timeout_s
        self._mailbox: Mailbox[tuple[int, object]] = Mailbox()
        self._taken: list[tuple[int, object]] = []  # from the mailbox, not yet returned
        self._tasks: list[asyncio.Task[None]] = []
        self._open = len(specs)
        self.request_ids: list[str] = []

    async def __aenter__(self) -> Choices:
        self._tasks = [asyncio.create_task(self._run(spec)) for spec in self._specs]
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, spec: ChoiceSpec) -> None:
        try:
            gen = self._ex.generate(
                spec.prompt_ids, spec.sampling, self._timeout_s, self._api, self._arrival
            )
            self.request_ids.append(gen.request_id)
            async with gen:
                async for out in gen:
                    self._mailbox.put((spec.index, out))
            self._mailbox.put((spec.index, _DONE))
        except Exception as exc:  # handed to the reader, who raises it
            self._mailbox.put((spec.index, exc))

    def __aiter__(self) -> Choices:
        return self

    async def __anext__(self) -> tuple[int, Output]:
        while self._open:
            if not self._taken:
                self._taken = await self._mailbox.take()
                self._taken.reverse()  # popped from the end, in arrival order
            index, item = self._taken.pop()
            if item is _DONE:
                self._open -= 1
                continue
            if isinstance(item, BaseException):
                self._open = 0
                raise item
            assert isinstance(item, Output)
            return index, item
        raise StopAsyncIteration
