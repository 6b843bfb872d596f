"""A stand-in for the prefill and decode pools, speaking the real Redis protocol.

It registers one prefill and one decode WorkerInfo, takes PrefillTasks from the model's
stream as consumer group "prefill", and runs them the way the decode workers do: in
steps, one token per running request per step (`tokens_per_step` more, each its own
delta, to test that a gateway coalesces what queued), each step's deltas published as
one TokenBatch per reply stream in one round trip. Steps start on a clock, one every
`token_delay_s` (a step that overruns its period is counted in `late_steps`, and the
next starts at once), so a paced pool offers streams / token_delay_s tokens/s however
long a step takes. Several of these processes share the task stream (each is its own
consumer of the group), which is how `tandem bench gateway` keeps the pool from
setting the pace. Without `stamp_tokens` a request's output
is its prompt's tokens, cycled, so tests know it in advance; with it each token id
encodes when its step was sent (`stamp_token`/`stamp_age_s`), which is how
`tandem bench gateway` measures the latency a gateway adds. Aborts stop a request before
its next token (pub/sub notice, or the marker for one not started yet); it records what
it saw, for tests.

Tests run it on their event loop; `tandem bench gateway` and the load tests run it as a
process of its own (`main`), so that it does not take the gateway's CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

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

READ_COUNT = 256  # tasks taken per XREADGROUP: small, so several pool processes share a burst
# Stamped token ids: STAMP_BASE + (send time in STAMP_UNIT_S units) mod STAMP_SPAN. Ids
# from 1000 up are ordinary tokens of every supported vocabulary (all are > 41,000).
STAMP_BASE = 1000
STAMP_SPAN = 40_000
STAMP_UNIT_S = 0.0005  # so ages wrap after 20 s; a gateway that slow has failed anyway


def expected_output(task_prompt: list[int], max_tokens: int) -> list[int]:
    return [task_prompt[i % len(task_prompt)] for i in range(max_tokens)]


def stamp_token(now: float) -> int:
    return STAMP_BASE + int(now / STAMP_UNIT_S) % STAMP_SPAN


def stamp_age_s(token_id: int, now: float) -> float:
    """Seconds from the step that sent `token_id` (a stamped token) to `now`."""
    sent = token_id - STAMP_BASE
    return ((int(now / STAMP_UNIT_S) - sent) % STAMP_SPAN) * STAMP_UNIT_S


@dataclass
class _Running:
    task: PrefillTask
    entry_id: bytes  # in the prefill stream, deleted once its first token went out
    output: list[int]
    sent: int = 0
    replayed: bool = False


class FakeWorker:
    def __init__(
        self,
        redis_url: str,
        model: str,
        token_delay_s: float = 0.005,
        stamp_tokens: bool = False,
    ) -> None:
        self.redis_url = redis_url
        self.model = model
        self.token_delay_s = token_delay_s  # from one step's start to the next's
        self.stamp_tokens = stamp_tokens
        self.tokens_per_step = 1  # per running request, each token its own delta
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
        self.tokens_sent = 0
        self.steps = 0
        self.late_steps = 0  # steps that took longer than token_delay_s (paced pools)
        self._ids = (
            f"fake-prefill-{os.getpid()}-{id(self)}",
            f"fake-decode-{os.getpid()}-{id(self)}",
        )
        self.decode_id = self._ids[1]
        self._redis: aioredis.Redis | None = None
        self._loops: list[asyncio.Task] = []
        self._running: dict[str, _Running] = {}
        self._notified: set[str] = set()  # running requests whose abort notice came
        self._work = asyncio.Event()
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
        self._loops = [
            asyncio.create_task(self._heartbeat()),
            asyncio.create_task(self._consume()),
            asyncio.create_task(self._listen(pubsub)),
            asyncio.create_task(self._steps()),
        ]
        return self

    async def stop(self) -> None:
        self._stopping = True
        for t in self._loops:
            t.cancel()
        await asyncio.wait(self._loops, timeout=2)
        assert self._redis is not None
        with contextlib.suppress(RedisError):  # Redis gone: the entries expire anyway
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
                    notice = decode(message["data"], AbortNotice)
                    self.notices.append(notice)
                    if notice.request_id in self._running:
                        self._notified.add(notice.request_id)
        finally:
            await pubsub.aclose()

    async def _consume(self) -> None:
        assert self._redis is not None
        stream = redis_keys.prefill_stream(self.model)
        while not self._stopping:
            reply = await self._redis.xreadgroup(
                redis_keys.PREFILL_GROUP, self._ids[0], {stream: ">"}, count=READ_COUNT, block=100
            )
            errors: dict[str, list[TokenDelta]] = {}
            answered: list[bytes] = []
            for _name, entries in reply or ():
                for entry_id, fields in entries:
                    try:
                        task = decode(fields[redis_keys.MESSAGE_FIELD], PrefillTask)
                    except (KeyError, ValueError):
                        continue  # left in the stream, like a task nobody could take
                    self.tasks.append(task)
                    if self.stall:
                        continue
                    if self.error is not None:
                        code, message = self.error
                        delta = TokenDelta(
                            request_id=task.request_id, error=message, error_code=code
                        )
                        errors.setdefault(task.reply_stream, []).append(delta)
                        answered.append(entry_id)
                        continue
                    output = expected_output(task.prompt_token_ids, task.sampling.max_tokens)
                    self._running[task.request_id] = _Running(task, entry_id, output)
            await self._publish(errors, answered)
            self._work.set()

    async def _steps(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not self._stopping:
            if not self._running:
                self._work.clear()
                await self._work.wait()
                next_at = loop.time()
            await self._step()
            self.steps += 1
            next_at += self.token_delay_s
            now = loop.time()
            if self.token_delay_s > 0 and now > next_at:
                self.late_steps += 1
                next_at = now  # no catching up in a burst: that would not be paced
            await asyncio.sleep(max(next_at - now, 0.0))

    async def _step(self) -> None:
        """One token for every running request, minus those aborted since the last step."""
        assert self._redis is not None
        running = list(self._running.values())
        # As the workers do: a request started before its abort hears the pub/sub
        # notice; one whose abort came before it was read finds the marker.
        new = [job for job in running if job.sent == 0]
        async with self._redis.pipeline(transaction=False) as pipe:
            for job in new:
                pipe.exists(redis_keys.abort_marker(job.task.request_id))
            found = await pipe.execute()
        marked = {job.task.request_id for job, m in zip(new, found, strict=True) if m}
        deltas: dict[str, list[TokenDelta]] = {}
        started: list[bytes] = []  # entries of requests whose first token goes out now
        now = time.time()
        for job in running:
            rid = job.task.request_id
            if rid in marked or rid in self._notified:
                self._notified.discard(rid)
                self.aborted.add(rid)
                del self._running[rid]
                if job.sent == 0:
                    started.append(job.entry_id)
                continue
            if job.sent == 0:
                started.append(job.entry_id)
            batch = deltas.setdefault(job.task.reply_stream, [])
            for _ in range(self.tokens_per_step):
                if self._next_token(job, batch, now):
                    del self._running[rid]
                    break
        if self.stamp_tokens:
            # Stamped again as the step goes out, so that building it (milliseconds for
            # a thousand requests) does not count as the gateway's latency.
            stamp = stamp_token(time.time())
            for batch in deltas.values():
                for delta in batch:
                    delta.token_ids[0] = stamp
        await self._publish(deltas, started)

    def _next_token(self, job: _Running, batch: list[TokenDelta], now: float) -> bool:
        """Appends the job's next token to `batch`; True when that token ends it."""
        rid = job.task.request_id
        i = job.sent
        if self.replay_after is not None and i == self.replay_after and not job.replayed:
            # A retried prefill starts over: the gateway must drop what it has seen.
            job.replayed = True
            batch.append(TokenDelta(request_id=rid, token_ids=job.output[:i], offset=0))
        sampling = job.task.sampling
        tok = stamp_token(now) if self.stamp_tokens else job.output[i]
        last = i == len(job.output) - 1
        finish = "stop" if tok in sampling.stop_token_ids else ("length" if last else None)
        logprobs = None if sampling.logprobs is None else [{tok: -0.5, tok + 1: -1.5}]
        batch.append(
            TokenDelta(
                request_id=rid,
                token_ids=[tok],
                offset=i,
                finish_reason=finish,
                logprobs=logprobs,
                worker_id=self.decode_id if self.owned else None,
            )
        )
        job.sent = self.sent[rid] = i + 1
        return finish is not None

    async def _publish(self, deltas: dict[str, list[TokenDelta]], done: list[bytes]) -> None:
        """Deltas, one TokenBatch per reply stream; and the `done` prefill stream entries
        acknowledged and deleted, as a decode worker does once a request's first token
        went out: until then they count in the queue length (XLEN) the gateway admits by."""
        if not deltas and not done:
            return
        assert self._redis is not None
        async with self._redis.pipeline(transaction=False) as pipe:
            if done:
                stream = redis_keys.prefill_stream(self.model)
                pipe.xack(stream, redis_keys.PREFILL_GROUP, *done)
                pipe.xdel(stream, *done)
            for stream, batch in deltas.items():
                pipe.xadd(
                    stream,
                    {redis_keys.MESSAGE_FIELD: encode(TokenBatch(batch))},
                    maxlen=redis_keys.REPLY_STREAM_MAXLEN,
                    approximate=True,
                )
                self.tokens_sent += sum(len(d.token_ids) for d in batch)
            await pipe.execute()


def main() -> None:
    """`python -m tandem.bench.fake_pool --redis-url URL --model NAME`: until SIGTERM;
    prints "fake pool ready" once registered, and a JSON line of what it sent when it
    ends."""
    import argparse
    import json
    import signal

    parser = argparse.ArgumentParser(prog="python -m tandem.bench.fake_pool")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument(
        "--token-delay", type=float, default=0.0, help="seconds from one step's start to the next's"
    )
    parser.add_argument("--stamp-tokens", action="store_true", help="token ids carry send times")
    args = parser.parse_args()

    async def serve() -> FakeWorker:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        worker = await FakeWorker(
            args.redis_url, args.model, args.token_delay, args.stamp_tokens
        ).start()
        print("fake pool ready", flush=True)
        try:
            await stop.wait()
        finally:
            await worker.stop()
        return worker

    worker = asyncio.run(serve())
    sent = {"tokens": worker.tokens_sent, "steps": worker.steps, "late_steps": worker.late_steps}
    print(json.dumps(sent), flush=True)


if __name__ == "__main__":
    main()
