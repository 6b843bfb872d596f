"""Running a request, shared by the gRPC and HTTP front ends.

A front end validates and tokenizes (gateway.validation, gateway.openai_requests), then

    async with executor.generate(prompt_ids, sampling, timeout_s, api="http") as gen:
        async for out in gen:   # Output: new token ids, new text, logprobs, finish
            ...

`generate` assigns the gateway-owned request id and registers a queue with the reply
router *before* the task is queued, so no token can arrive unrouted; entering the block
XADDs the PrefillTask; iterating turns deltas into client text (incremental detokenizer,
stop strings) until a finish, a worker error, or the deadline (both raise RequestError).
Leaving the block any other way (client gone, cancelled, stop string, error) publishes
an abort, so the workers drop the request and free its blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TypeVar

import jinja2
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tandem.core import hop_trace, redis_keys
from tandem.core.protocol import PrefillTask, TokenDelta, encode
from tandem.core.request_checks import ModelLimits
from tandem.core.sampling_params import SamplingParams
from tandem.core.tokenizer import Tokenizer
from tandem.gateway.config import GatewayConfig
from tandem.gateway.detokenizer import TextStream
from tandem.gateway.metrics import GatewayMetrics
from tandem.gateway.redis_batch import RedisBatcher, SingleFlight
from tandem.gateway.reply_router import ReplyRouter, RequestStream
from tandem.gateway.task_watch import VanishedTasks
from tandem.gateway.token_text import TokenTexts
from tandem.gateway.worker_registry import WorkerRegistry

log = logging.getLogger(__name__)
T = TypeVar("T")

# Threads that template and tokenize prompts: off the event loop, so a huge prompt never
# stalls other streams, and few, so a flood of them cannot take every core.
TOKENIZER_THREADS = 2


class RequestError(Exception):
    """A request refused or failed, with a code both front ends map to their status.

    code: invalid_argument | unauthenticated | not_found | resource_exhausted |
    unavailable | deadline | internal (a worker may report others: they count as internal).
    """

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


@dataclass
class Output:
    """What one step of a request brought: new tokens and the text now final."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[dict[int, float]] = field(default_factory=list)  # one per token, if asked
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the last output
    prompt_tokens: int = 0
    completion_tokens: int = 0  # output tokens so far, this output's included
    cached_tokens: int = 0  # prompt tokens the prefill found in the prefix cache


class Executor:
    """Everything a request needs from the gateway: tokenizer, Redis, router, registry."""

    def __init__(
        self,
        config: GatewayConfig,
        limits: ModelLimits,
        tokenizer: Tokenizer,
        texts: TokenTexts,
        redis: aioredis.Redis,
        router: ReplyRouter,
        registry: WorkerRegistry,
        metrics: GatewayMetrics,
    ) -> None:
        self.config = config
        self._limits = limits
        self.tokenizer = tokenizer
        # Byte-level vocabularies: output text straight from each token's bytes.
        self.token_bytes = texts.output_bytes if texts.bytes_are_text else None
        self.redis = redis
        self.router = router
        self.registry = registry
        self.metrics = metrics
        self.prefill_stream = redis_keys.prefill_stream(config.model)
        self.writes = RedisBatcher(redis)
        # A burst of arrivals shares one read of the queue's length.
        self._queue_length = SingleFlight(lambda: self.redis.xlen(self.prefill_stream))
        self.inflight: dict[str, Generation] = {}
        self._tokenizer_pool = ThreadPoolExecutor(TOKENIZER_THREADS, "tokenize")
        self._preparing = 0  # requests admitted and being templated or tokenized

    @property
    def limits(self) -> ModelLimits:
        """The model's limits, with the context the workers registered when it is smaller
        (config.json may allow 128k tokens where the workers were started with 8k)."""
        served = self.registry.max_model_len
        if 0 < served < self._limits.max_model_len:
            return replace(self._limits, max_model_len=served)
        return self._limits

    # -- decode or colocated workers that die -------------------------------------------
    async def watch_owners(self) -> None:
        """Every `owner_check_s`: a request whose owner (the decode or colocated worker
        named by its deltas) left the registry (its entry expires a few seconds after its
        last heartbeat) is migrated or failed, so no stream waits on a dead worker until
        its deadline. With migrate only once it stayed out for owner_grace_s. A request
        whose queued task vanished (gateway.task_watch) fails the same way."""
        grace = self.config.owner_grace_s if self.config.migrate else 0.0
        missing_since: dict[str, float] = {}  # owner -> first check that missed it
        vanished = VanishedTasks(self.redis, self.prefill_stream)
        while True:
            await asyncio.sleep(self.config.owner_check_s)
            waiting = {g.request_id: g.queued_entry for g in self.inflight.values()}
            try:
                for rid in await vanished.check({r: e for r, e in waiting.items() if e}):
                    if (gen := self.inflight.get(rid)) is not None:
                        gen.task_lost()
            except RedisError:
                continue
            orphans = [g for g in self.inflight.values() if g.owner is not None]
            if not orphans:
                missing_since.clear()
                continue
            try:
                live = {w.worker_id for w in await self.registry.workers()}
            except RedisError:
                continue  # Redis is down: the router's reconnect path handles that
            now = time.monotonic()
            missing_since = {
                owner: missing_since.get(owner, now) for owner in {g.owner for g in orphans} - live
            }
            for gen in orphans:
                if gen.owner in missing_since and now - missing_since[gen.owner] >= grace:
                    await gen.owner_lost(self.config.migrate)

    # -- checks shared by both front ends -----------------------------------------------
    def check_api_key(self, authorization: str | None) -> None:
        key = self.config.api_key
        if key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), key.encode()
        ):
            raise RequestError(
                "unauthenticated", "missing or invalid API key (send 'Authorization: Bearer KEY')"
            )

    def check_model(self, model: str | None) -> None:
        if model and model != self.config.model:
            raise RequestError(
                "not_found",
                f"model {model!r} is not served here (this gateway serves {self.config.model!r})",
                param="model",
            )

    def check_active(self, requests: int) -> None:
        active = self.router.active + self._preparing
        if active + requests > self.config.max_active_requests:
            raise RequestError(
                "resource_exhausted",
                f"gateway overloaded: {active} requests in flight, the limit is "
                f"{self.config.max_active_requests}; retry later",
            )

    @contextlib.contextmanager
    def admitted(self, requests: int = 1) -> Iterator[None]:
        """Hold `requests` places among max_active_requests while a request is templated
        and tokenized (after its cheap checks, before that work): a flood of huge
        prompts is refused at once instead of queueing for the tokenizer threads."""
        self.check_active(requests)
        self._preparing += requests
        try:
            yield
        finally:
            self._preparing -= requests

    async def check_available(self, requests: int = 1) -> None:
        """Refuse at once what cannot be served now: overload, or no workers."""
        self.check_active(requests)
        if self.config.max_queued_tasks:
            try:
                queued = await self._queue_length()
            except RedisError:
                queued = 0  # the registry check below reports Redis being down
            if queued + requests > self.config.max_queued_tasks:
                raise RequestError(
                    "resource_exhausted",
                    f"prefill queue full: {queued} tasks waiting, the limit is "
                    f"{self.config.max_queued_tasks}; retry later",
                )
        try:
            reason = await self.registry.unavailable_reason()
        except RedisError as exc:
            reason = f"worker registry unreachable: {exc}"
        if reason is not None:
            raise RequestError("unavailable", reason)

    async def _off_loop(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_pool, fn, *args)

    async def encode(self, prompt: str) -> list[int]:
        return await self._off_loop(self.tokenizer.encode, prompt, True)

    async def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The chat template applied and tokenized; ValueError when the template refuses."""
        try:
            return await self._off_loop(self.tokenizer.encode_chat, messages)
        except jinja2.TemplateError as exc:
            raise ValueError(f"chat template failed on these messages: {exc}") from exc

    # -- running ------------------------------------------------------------------------
    def generate(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams,
        timeout_s: float | None = None,
        api: str = "grpc",
        arrival: float | None = None,
    ) -> Generation:
        """One request to the workers; use as `async with` (see the module docstring).

        arrival: time.monotonic() when the client's request came in (for TTFT).
        """
        timeout = self.config.request_timeout_s if timeout_s is None else timeout_s
        return Generation(self, prompt_ids, sampling, timeout, api, arrival)

    def abort_later(self, request_id: str, reason: str) -> None:
        """Tell every worker to drop the request (batched with other requests' writes)."""
        self.writes.abort(request_id, reason)

    async def drain(self) -> None:
        """Wait for aborts still being published, stop the tokenizer threads (at shutdown)."""
        await self.writes.drain()
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)


class Generation:
    """One request in flight: an async context manager and an async iterator of Outputs."""

    def __init__(
        self,
        executor: Executor,
        prompt_ids: list[int],
        sampling: SamplingParams,
        timeout_s: float,
        api: str,
        arrival: float | None,
    ) -> None:
        self.request_id = uuid.uuid4().hex
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.timeout_s = timeout_s
        self._ex = executor
        self._api = api
        self._arrival = time.monotonic() if arrival is None else arrival
        self._deadline = time.monotonic() + timeout_s
        self._text = TextStream(executor.tokenizer, prompt_ids, sampling.stop, executor.token_bytes)
        self._stream: RequestStream | None = None
        # One timer for the request's life, not one per wait for tokens: at the
        # deadline it ends the stream with a "deadline" error.
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._entry: bytes | None = None  # its task's entry in the prefill stream
        self._deltas_before_entry = 0  # the stream's delta count when that entry was made
        self._completion_tokens = 0
        self._cached_tokens = 0
        self._first_token_at: float | None = None
        self._last_output_at = 0.0
        self._done = False  # finished or failed: no more outputs
        # Why the workers must drop the request; None only when they finished it. A
        # worker-reported error still aborts: another worker may hold a reservation.
        self._abort_reason: str | None = "cancelled, timed out or failed at the gateway"

    def _task(self, output_token_ids: list[int]) -> PrefillTask:
        return PrefillTask(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_ids,
            sampling=self.sampling,
            reply_stream=self._ex.router.stream,
            deadline=time.time() + max(self._deadline - time.monotonic(), 0.0),
            output_token_ids=output_token_ids,
        )

    @property
    def owner(self) -> str | None:
        return self._stream.owner if self._stream is not None and not self._done else None

    @property
    def queued_entry(self) -> bytes | None:
        """Its task's stream entry while no worker has answered it yet, else None. Any
        delta is an answer: workers delete the entry only after publishing one."""
        stream = self._stream
        if stream is None or stream.closed or self._done:
            return None
        return self._entry if stream.deltas == self._deltas_before_entry else None

    def task_lost(self) -> None:
        if self._stream is not None:
            self._stream.push(TokenDelta(
                request_id=self.request_id, error_code="unavailable",
                error="its queued task was lost (Redis restarted without it); retry",
            ))  # fmt: skip

    async def owner_lost(self, migrate: bool) -> None:
        stream = self._stream
        if stream is None or stream.closed:
            return
        lost = stream.owner
        stream.owner = None
        if migrate:
            # Same request id: a prefill or colocated worker recomputes prompt + tokens so
            # far and the next delta starts at the next offset: nothing lost or repeated.
            log.warning("worker %s lost; migrating %s after %d tokens", lost,
                        self.request_id, len(stream.token_ids),
                        extra={"request_id": self.request_id})  # fmt: skip
            self._entry, self._deltas_before_entry = None, stream.deltas
            try:
                self._entry = await self._ex.writes.xadd(
                    self._ex.prefill_stream, encode(self._task(list(stream.token_ids)))
                )
                return
            except RedisError as exc:
                log.warning("migration of %s failed: %s", self.request_id, exc)
        stream.push(
            TokenDelta(
                request_id=self.request_id,
                error=f"worker {lost} was lost",
                error_code="unavailable",
            )
        )

    async def __aenter__(self) -> Generation:
        ex = self._ex
        rid = self.request_id
        # Checked again where the request takes its slot: a burst can pass the front
        # end's check all at once, before any of it is registered.
        ex.check_active(1)
        self._stream = ex.router.register(rid)
        task = self._task([])
        if hop_trace.ENABLED:
            hop_trace.mark(rid, "queued")
        try:
            self._entry = await ex.writes.xadd(ex.prefill_stream, encode(task))
        except BaseException as exc:
            ex.router.unregister(rid)
            # Cancelled or cut off mid-XADD, the task may be queued all the same.
            ex.abort_later(rid, "not queued: cancelled or Redis failed")
            if isinstance(exc, RedisError):
                raise RequestError("unavailable", f"prefill queue unreachable: {exc}") from exc
            raise
        ex.inflight[rid] = self
        loop = asyncio.get_running_loop()
        wait_s = max(self._deadline - time.monotonic(), 0.0)
        self._deadline_timer = loop.call_at(loop.time() + wait_s, self._expire)
        ex.metrics.active.inc()
        log.info("request %s queued (%s): %d prompt tokens, max_tokens %d", rid, self._api,
                 len(self.prompt_ids), self.sampling.max_tokens,
                 extra={"request_id": rid})  # fmt: skip
        return self

    def _expire(self) -> None:
        if self._stream is not None:
            self._stream.push(TokenDelta(
                request_id=self.request_id, error_code="deadline",
                error=f"request {self.request_id} did not finish within {self.timeout_s:.1f}s",
            ))  # fmt: skip

    async def __aexit__(self, exc_type, exc, tb) -> None:
        ex = self._ex
        rid = self.request_id
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        ex.router.unregister(rid)
        ex.inflight.pop(rid, None)
        ex.metrics.active.dec()
        if self._abort_reason is not None:
            ex.abort_later(rid, self._abort_reason)
        if not self._done:  # the client left or the handler was cancelled
            ex.metrics.finished("abort", self._api, len(self.prompt_ids))
            log.info("request %s aborted after %d tokens: %s", rid, self._completion_tokens,
                     self._abort_reason, extra={"request_id": rid})  # fmt: skip

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> Output:
        if self._done or self._stream is None:
            raise StopAsyncIteration
        while True:
            deltas = await self._stream.get_many()
            out = Output(prompt_tokens=len(self.prompt_ids))
            pieces: list[str] = []
            worker_finished = False
            # Without stop strings the message's tokens are detokenized in one call;
            # with them, delta by delta, so that a stop ends the message where it hit.
            by_delta = self._text.has_stop_strings
            for delta in deltas:
                if delta.error is not None:
                    raise self._fail(delta.error_code or "internal", delta.error)
                out.token_ids.extend(delta.token_ids)
                self._cached_tokens = max(self._cached_tokens, delta.cached_tokens)
                if delta.logprobs:
                    out.logprobs.extend(delta.logprobs)
                out.finish_reason = delta.finish_reason
                worker_finished = delta.finish_reason is not None
                if by_delta:
                    pieces.append(self._text.add(delta.token_ids))
                    if self._text.stopped:
                        out.finish_reason = "stop"
                        break
                if worker_finished:
                    break
            if not by_delta:
                pieces.append(self._text.add(out.token_ids))
            if worker_finished and not self._text.stopped:
                pieces.append(self._text.finish())
            out.text = "".join(pieces)
            self._completion_tokens += len(out.token_ids)
            out.completion_tokens = self._completion_tokens
            out.cached_tokens = self._cached_tokens
            self._observe(out)
            if (
                hop_trace.ENABLED
                and out.token_ids
                and self._completion_tokens == len(out.token_ids)
            ):
                hop_trace.mark(self.request_id, "answered")
            if out.finish_reason is not None:
                # A stop string ends the request here; the workers do not know yet.
                self._abort_reason = None if worker_finished else "stop string"
                self._finish(out.finish_reason)
                return out
            if out.token_ids or out.text:
                return out

    def _observe(self, out: Output) -> None:
        if not out.token_ids:
            return
        now = time.monotonic()
        metrics = self._ex.metrics
        count = len(out.token_ids)
        if self._first_token_at is None:
            self._first_token_at = now
            metrics.ttft.observe(now - self._arrival)
            metrics.tokens.add(count, None)
        else:
            metrics.tokens.add(count, (now - self._last_output_at) / count)
        self._last_output_at = now

    def _finish(self, reason: str) -> None:
        self._done = True
        now = time.monotonic()
        metrics = self._ex.metrics
        metrics.e2e.observe(now - self._arrival)
        if self._first_token_at is not None and self._completion_tokens > 1:
            metrics.tpot.observe((now - self._first_token_at) / (self._completion_tokens - 1))
        metrics.finished(reason, self._api, len(self.prompt_ids))
        log.info("request %s finished (%s): %d prompt + %d output tokens in %.3fs",
                 self.request_id, reason, len(self.prompt_ids), self._completion_tokens,
                 now - self._arrival, extra={"request_id": self.request_id})  # fmt: skip

    def _fail(self, code: str, reason: str) -> RequestError:
        """End the request with an error, returned for the caller to raise; logged with
        the request's id so that an operator can tell which request failed and why."""
        self._done = True
        log.warning("request %s failed (%s) after %d output tokens: %s", self.request_id,
                    code, self._completion_tokens, reason,
                    extra={"request_id": self.request_id})  # fmt: skip
        return RequestError(code, reason)
