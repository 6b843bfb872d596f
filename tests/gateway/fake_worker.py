"""A stand-in for the prefill and decode pools, speaking the real Redis protocol.

It registers one prefill and one decode WorkerInfo, takes PrefillTasks from the model's
stream as consumer group "prefill", and answers each with one token per TokenDelta: the
prompt's tokens, cycled, so that tests know the output in advance. It checks the abort
marker before every token and records what it saw, so tests can assert on aborts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from tandem.core import redis_keys
from tandem.core.protocol import (
    AbortNotice,
    PrefillTask,
    TokenBatch,
    TokenDelta,
    WorkerInfo,
    decode,
    encode,
)


def expected_output(task_prompt: list[int], max_tokens: int) -> list[int]:
    return [task_prompt[i % len(task_prompt)] for i in range(max_tokens)]


class FakeWorker:
    def __init__(self, redis_url: str, model: str, token_delay_s: float = 0.005) -> None:
        self.redis_url = redis_url
        self.model = model
        self.token_delay_s = token_delay_s
        # Behaviour switches, set by tests before sending a request.
        self.error: tuple[str, str] | None = None  # (error_code, message) instead of tokens
        self.replay_after: int | None = None  # re-send the output from 0 after n tokens
        self.stall = False  # take tasks, never answer
        self.owned = False  # name its decode worker as the owner in every delta
        # What happened, read by tests.
        self.tasks: list[PrefillTask] = []
        self.sent: dict[str, int] = {}  # request id -> tokens sent
        self.aborted: set[str] = set()  # saw the abort marker while generating
        self.notices: list[AbortNotice] = []  # from the pub/sub channel
        self._ids = (
            f"fake-prefill-{os.getpid()}-{id(self)}",
            f"fake-decode-{os.getpid()}-{id(self)}",
        )
        self.decode_id = self._ids[1]
        self._redis: aioredis.Redis | None = None
        self._tasks: list[asyncio.Task] = []
        self._answering: set[asyncio.Task] = set()
        # redis-py can swallow a cancellation that lands inside a blocking command, so
        # every loop also checks this flag and stop() does not wait forever.
        self._stopping = False

    async def start(self) -> FakeWorker:
        self._redis = aioredis.Redis.from_url(self.redis_url, socket_timeout=5)
        with contextlib.suppress(ResponseError):  # BUSYGROUP: made by an earlier worker
            await self._redis.xgroup_create(
                redis_keys.prefill_stream(self.model),
                redis_keys.PREFILL_GROUP,
                id="$",
                mkstream=True,
            )
        await self._register()
        pubsub = self._redis.pubsub()
        await pubsub.subscribe(redis_keys.ABORT_CHANNEL)
        self._tasks = [
            asyncio.create_task(self._heartbeat()),
            asyncio.create_task(self._consume()),
            asyncio.create_task(self._listen(pubsub)),
        ]
        return self

    async def stop(self) -> None:
        self._stopping = True
        tasks = [*self._tasks, *self._answering]
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks, timeout=2)
        assert self._redis is not None
        await self._redis.delete(*(redis_keys.worker_key(i) for i in self._ids))
        await self._redis.aclose()

    async def _register(self) -> None:
        assert self._redis is not None
        for worker_id, role in zip(self._ids, ("prefill", "decode"), strict=True):
            info = WorkerInfo(
                worker_id=worker_id,
                role=role,
                model=self.model,
                pid=os.getpid(),
                heartbeat=time.time(),
            )
            key = redis_keys.worker_key(worker_id)
            await self._redis.hset(key, "info", encode(info))
            await self._redis.expire(key, redis_keys.WORKER_TTL_S)

    async def _heartbeat(self) -> None:
        while not self._stopping:
            await asyncio.sleep(1.0)
            await self._register()

    async def _listen(self, pubsub) -> None:
        try:
            while not self._stopping:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
                if message and message["type"] == "message":
                    self.notices.append(decode(message["data"], AbortNotice))
        finally:
            await pubsub.aclose()

    async def _consume(self) -> None:
        assert self._redis is not None
        stream = redis_keys.prefill_stream(self.model)
        running = self._answering
        while not self._stopping:
            reply = await self._redis.xreadgroup(
                redis_keys.PREFILL_GROUP, "fake", {stream: ">"}, count=16, block=100
            )
            for _name, entries in reply or ():
                for entry_id, fields in entries:
                    task = decode(fields[redis_keys.MESSAGE_FIELD], PrefillTask)
                    self.tasks.append(task)
                    await self._redis.xack(stream, redis_keys.PREFILL_GROUP, entry_id)
                    t = asyncio.create_task(self._answer(task))
                    running.add(t)
                    t.add_done_callback(running.discard)

    async def _send(self, task: PrefillTask, delta: TokenDelta) -> None:
        assert self._redis is not None
        await self._redis.xadd(
            task.reply_stream,
            {redis_keys.MESSAGE_FIELD: encode(TokenBatch([delta]))},
            maxlen=redis_keys.REPLY_STREAM_MAXLEN,
            approximate=True,
        )

    async def _answer(self, task: PrefillTask) -> None:
        assert self._redis is not None
        rid = task.request_id
        if self.stall:
            return
        if self.error is not None:
            code, message = self.error
            await self._send(task, TokenDelta(request_id=rid, error=message, error_code=code))
            return
        output = expected_output(task.prompt_token_ids, task.sampling.max_tokens)
        i = 0
        replayed = False
        while i < len(output) and not self._stopping:
            if await self._redis.exists(redis_keys.abort_marker(rid)):
                self.aborted.add(rid)
                return
            if self.replay_after is not None and i == self.replay_after and not replayed:
                # A retried prefill starts over: the gateway must drop what it has seen.
                replayed = True
                await self._send(task, TokenDelta(request_id=rid, token_ids=output[:i], offset=0))
            tok = output[i]
            last = i == len(output) - 1
            stop = tok in task.sampling.stop_token_ids
            finish = "stop" if stop else ("length" if last else None)
            logprobs = None if task.sampling.logprobs is None else [{tok: -0.5, tok + 1: -1.5}]
            await self._send(
                task,
                TokenDelta(
                    request_id=rid,
                    token_ids=[tok],
                    offset=i,
                    finish_reason=finish,
                    logprobs=logprobs,
                    worker_id=self.decode_id if self.owned else None,
                ),
            )
            self.sent[rid] = i + 1
            if finish:
                return
            i += 1
            await asyncio.sleep(self.token_delay_s)
