"""One model on one device with its scheduler: the loop `LLM` and the workers drive."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace

import torch

from tandem.core import hop_trace
from tandem.core.config import CacheConfig, SchedulerConfig
from tandem.core.request_checks import ModelLimits, check_tokens
from tandem.core.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from tandem.core.sequence import Sequence, SequenceStatus
from tandem.core.tokenizer import Tokenizer
from tandem.engine.checkpoint_resolver import model_name, resolve_model
from tandem.engine.kv_cache import KVCache
from tandem.engine.model_config import ModelConfig
from tandem.engine.model_runner import (
    ModelRunner,
    PendingStep,
    StepInputs,
    default_device,
    resolve_dtype,
)
from tandem.engine.step_isolation import Logprobs, Sampled, StepFailed, isolate
from tandem.engine.warmup import warm_up_kernels

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineConfig", "StepFailed"]

CPU_KV_CACHE_BYTES = 1 << 30
# A step launched ahead is queued this long before the device is expected to finish the
# step before it: time enough to launch a decode graph, short enough that a request
# arriving meanwhile joins the next step instead of waiting behind one more decode step.
LAUNCH_AHEAD_MARGIN_S = 0.001


@dataclass(frozen=True)
class EngineConfig:
    model: str = "smollm2"
    device: str | None = None  # None: cuda if present else cpu
    dtype: str | None = None  # None: float32 on cpu, bfloat16 on gpu
    load_format: str = "auto"
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    kv_cache_bytes: int = CPU_KV_CACHE_BYTES  # used when cache.num_blocks is 0
    num_threads: int = 0  # CPU threads for torch (0: torch's default)
    gpu_memory_utilization: float = 0.9  # CUDA: share of GPU memory for weights + KV
    attention_backend: str = "auto"  # auto (triton on cuda), torch, triton
    enforce_eager: bool = False  # CUDA: no CUDA graphs
    # CUDA: steps of up to this many tokens that are not plain decodes replay piecewise
    # graphs (engine/prefill_graphs.py); 0: they run eagerly.
    prefill_graph_tokens: int = 512
    # Build step N+1's inputs on the host while the device runs step N (steady decode).
    overlap_scheduling: bool = True
    # ...and queue step N+1 on the device before waiting for step N's tokens, so the
    # device never idles between decode steps. None: on CUDA only (on CPU the forward
    # runs inside the launch, so launching ahead would only delay step N's tokens).
    launch_ahead: bool | None = None

    @property
    def weights_salt(self) -> str:
        """What besides the model name decides the weights, hence the KV: the seed of
        dummy weights (prefix hashes must differ when the weights do)."""
        return f"dummy:{self.seed}" if self.load_format == "dummy" else ""

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "safetensors", "dummy"):
            raise ValueError("load_format must be auto, safetensors or dummy")
        if self.kv_cache_bytes <= 0:
            raise ValueError("kv_cache_bytes must be positive")
        if not 0.05 <= self.gpu_memory_utilization <= 0.99:
            raise ValueError("gpu_memory_utilization must be in [0.05, 0.99]")
        if self.prefill_graph_tokens and not 16 <= self.prefill_graph_tokens <= 4096:
            raise ValueError("prefill_graph_tokens must be 0 (off) or in [16, 4096]")


class Engine:
    def __init__(self, config: EngineConfig, requeue_preempted: bool = True) -> None:
        self.config = config
        self.model_dir = resolve_model(config.model)
        self.name = model_name(config.model)
        self.model_config = ModelConfig.from_dir(self.model_dir, self.name)
        self.tokenizer = (
            Tokenizer(self.model_dir) if (self.model_dir / "tokenizer.json").exists() else None
        )
        device = config.device or default_device()
        if config.num_threads > 0:
            torch.set_num_threads(config.num_threads)
        dtype = resolve_dtype(config.dtype, device)
        sched_cfg = config.scheduler
        max_len = min(sched_cfg.max_model_len, self.model_config.max_position_embeddings)
        self.runner = ModelRunner(
            self.model_config,
            self.model_dir,
            device,
            dtype,
            config.load_format,
            config.seed,
            config.attention_backend,
            max_len,
        )
        block_size = config.cache.block_size
        num_blocks = config.cache.num_blocks
        cuda = self.runner.device.type == "cuda"
        if not num_blocks and cuda:
            num_blocks = self.runner.profile_num_blocks(
                block_size, sched_cfg.max_num_batched_tokens, config.gpu_memory_utilization
            )
        elif not num_blocks:
            layout = self.runner.kv_layout(block_size)
            num_blocks = max(1, config.kv_cache_bytes // layout.bytes_per_block)
        # The one owner of the cache's tensors and blocks; `kv` is its block owner.
        self.kv_cache = KVCache(
            self.runner.kv_layout(block_size),
            num_blocks,
            self.runner.device,
            enable_prefix_caching=config.cache.enable_prefix_caching,
            weights_salt=config.weights_salt,
        )
        self.kv = self.kv_cache.blocks
        self.runner.attach_kv_cache(self.kv_cache)
        if cuda and not config.enforce_eager and self.runner.ops.name == "triton":
            prefill_tokens = min(config.prefill_graph_tokens, sched_cfg.max_num_batched_tokens)
            self.runner.capture_graphs(
                min(sched_cfg.max_num_seqs, 512),
                max_len,
                prefill_tokens if prefill_tokens >= 16 else 0,
            )
        if cuda and self.runner.ops.name == "triton":
            warm_up_kernels(
                self.runner, sched_cfg.max_num_seqs, sched_cfg.max_num_batched_tokens, max_len
            )
        if sched_cfg.max_model_len > self.model_config.max_position_embeddings:
            sched_cfg = replace(sched_cfg, max_model_len=self.model_config.max_position_embeddings)
        eos = self.model_config.eos_token_ids | (
            self.tokenizer.eos_token_ids if self.tokenizer else frozenset()
        )
        self.eos_token_ids = eos
        self.scheduler = Scheduler(sched_cfg, self.kv, eos, requeue_preempted)
        self._planned: StepInputs | None = None  # inputs prepare_next built ahead
        self._ahead: tuple[SchedulerOutput, PendingStep] | None = None  # launched ahead
        self._stepping: SchedulerOutput | None = None  # the step being run, for StepFailed
        launch_ahead = config.launch_ahead
        self._launch_ahead = (
            cuda if launch_ahead is None else launch_ahead
        ) and config.overlap_scheduling
        # Set by a worker whose requests arrive on another thread: whether one waits to
        # be admitted. A step is then launched ahead only late (see _wait_to_launch_ahead).
        self.arrivals_pending: Callable[[], bool] | None = None
        self._decode_step_s: float | None = None  # a decode step's device time, averaged
        self._device_free_at = 0.0  # when the host last saw a step finish
        self.num_planned_steps = 0  # steps that ran on inputs built during the last one
        self.num_launched_ahead = 0  # ...of which queued before the last one's tokens
        log.info(
            "engine ready: %s on %s (%s), %d KV blocks of %d tokens",
            self.name,
            device,
            dtype,
            num_blocks,
            block_size,
        )

    @property
    def max_model_len(self) -> int:
        return self.scheduler.config.max_model_len

    @property
    def limits(self) -> ModelLimits:
        return ModelLimits(self.max_model_len, self.model_config.vocab_size)

    def add(self, seq: Sequence) -> None:
        check_tokens(seq.prompt_token_ids, seq.output_token_ids, seq.sampling, self.limits)
        self.scheduler.add(seq)
        if hop_trace.ENABLED:
            hop_trace.mark(seq.request_id, "admitted")

    @property
    def has_work(self) -> bool:
        """Sequences to run, or a step launched ahead whose results are not taken yet."""
        return self.scheduler.has_work or self._ahead is not None

    def step(
        self, lock: AbstractContextManager | None = None
    ) -> tuple[SchedulerOutput, list[Sequence]]:
        """`_step`. When running the step raises, the requests that made it raise are
        isolated (engine.step_isolation) and StepFailed names them, carrying the rest of
        the step's results; when scheduling or applying a step raises, StepFailed names
        every sequence it ran. The caller fails the named requests (and frees their
        blocks) while the engine serves on."""
        lock = lock or nullcontext()
        self._stepping = None
        try:
            return self._step(lock)
        except StepFailed:
            raise
        except Exception as exc:
            with lock:
                failed = self._abandon_step()
            log.exception("a step of %d sequence(s) failed", len(failed))
            # Its schedule still counts: sequences it preempted need their callers.
            raise StepFailed(failed, self._stepping) from exc

    def _abandon_step(self) -> list[str]:
        """After a step raised: drop what was planned or launched ahead and name the
        sequences the step ran, or every running one if it failed before it had a
        schedule."""
        self._drop_ahead()
        if self._stepping is None:
            return [seq.request_id for seq in self.scheduler.running]
        return [chunk.seq.request_id for chunk in self._stepping.chunks]

    def _drop_ahead(self) -> None:
        """Forget the plan and the step launched ahead (its blocks are released once it
        is done on the device): both assumed the step before them succeeded."""
        self._planned = None
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            try:
                ahead[1].result()
            except Exception:
                log.warning("the step launched ahead failed too")
            self.kv.step_done(ahead[1].step)

    def _step(self, lock: AbstractContextManager) -> tuple[SchedulerOutput, list[Sequence]]:
        """Schedule and run one step; return the schedule and sequences with a new token.

        With `lock`, scheduler state is touched only while holding it and the forward
        pass runs without it, so a control thread can reserve blocks or admit requests
        while the device works. With overlap_scheduling, the next step's inputs are
        built while the device runs this one, and used if the next schedule matches;
        with launch_ahead, that next step is already queued on the device when it is
        safe to assume it (see _may_launch_ahead), and the next call returns its
        results without scheduling.
        """
        with lock:
            ahead, self._ahead = self._ahead, None
            if ahead is None:
                out = self.scheduler.schedule()
                self._stepping = out
                planned, self._planned = self._planned, None
                if not out:
                    return out, []
            else:
                out = ahead[0]
                self._stepping = out
        culprits: list[str] = []
        _mark_prompts(out, "scheduled")
        try:
            pending = ahead[1] if ahead else self._prepare_and_launch(out, planned, lock)
            _mark_prompts(out, "launched")
            started = max(pending.launched_at, self._device_free_at)
            self._plan_next(out, pending, started, lock)
            try:
                sampled, logprobs = pending.result()
                _mark_prompts(out, "sampled")
            finally:
                self._time_step(pending, started)
                with lock:
                    self.kv.step_done(pending.step)
        except Exception:
            log.exception("a step of %d sequence(s) failed; isolating", len(out.chunks))
            with lock:
                self._drop_ahead()
            sampled, logprobs, culprits = isolate(
                out.chunks, lambda chunks: self._run_alone(chunks, lock)
            )
        with lock:
            if not culprits:
                return out, self.scheduler.update(out, sampled, logprobs)
            failed = set(culprits)
            rest = SchedulerOutput([c for c in out.chunks if c.seq.request_id not in failed])
            got = self.scheduler.update(rest, sampled, logprobs)
        raise StepFailed(culprits, out, got)

    def _prepare_and_launch(
        self, out: SchedulerOutput, planned: StepInputs | None, lock: AbstractContextManager
    ) -> PendingStep:
        with lock:
            if planned is not None and _matches(planned, out):
                inputs = planned
                self.num_planned_steps += 1
            else:
                inputs = self.runner.prepare(out, self.kv)
            number = self.kv.step_launched()
        return self._launch(inputs, number, lock)

    def _plan_next(self, out: SchedulerOutput, pending: PendingStep, started: float, lock) -> None:
        """With overlap_scheduling, build (and maybe launch) the step after `out` while
        the device runs `out`. Only an optimisation: if building it raises, the next
        step is scheduled and built afresh (and isolated there if it raises again)."""
        if not self.config.overlap_scheduling:
            return
        try:
            with lock:
                nxt = self.runner.prepare_next(out, pending.inputs, pending, self.kv)
                if nxt is None or not self._may_launch_ahead(out):
                    self._planned = nxt
                    return
                number = self.kv.step_launched() if self.arrivals_pending is None else None
            if number is None:  # a worker's: launched late, unless a request arrives
                ready = self._wait_to_launch_ahead(pending, started)
                with lock:
                    if not ready or not self._may_launch_ahead(out):
                        self._planned = nxt
                        return
                    number = self.kv.step_launched()
            try:
                launched = self.runner.launch(nxt)
            except BaseException:
                # Steps finish in order: once `pending` is done, so is this number.
                self._settle_device()
                pending.step = number
                raise
        except Exception:
            log.exception("building the next step failed; it will be built afresh")
            self._planned = None
            return
        launched.step, launched.inputs = number, nxt
        self._ahead = (_next_decodes(out), launched)
        self.num_planned_steps += 1
        self.num_launched_ahead += 1

    def _wait_to_launch_ahead(self, pending: PendingStep, started: float) -> bool:
        """Hold the launch ahead until shortly before `pending` (which the device began
        near `started`) is expected to end; False if a request arrived meanwhile
        (arrivals_pending, set), which then joins the next step."""
        if self._decode_step_s is None:
            return not self.arrivals_pending()
        launch_at = started + self._decode_step_s - LAUNCH_AHEAD_MARGIN_S
        while not self.arrivals_pending():
            left = launch_at - time.perf_counter()
            if left <= 0 or pending.done():
                return True
            time.sleep(min(left, 0.0005))
        return False

    def _time_step(self, pending: PendingStep, started: float) -> None:
        """Average the device time of decode steps (what _wait_to_launch_ahead expects
        the next one to take); note when the device became free."""
        now = time.perf_counter()
        self._device_free_at = now
        if pending.inputs is None or pending.inputs.meta.max_query_len != 1:
            return
        took = now - started
        avg = self._decode_step_s
        self._decode_step_s = took if avg is None else 0.8 * avg + 0.2 * took

    def _run_alone(
        self, chunks: list[ScheduledChunk], lock: AbstractContextManager
    ) -> tuple[Sampled, Logprobs]:
        """Run `chunks` of a failed step as a step of their own (step isolation), leaving
        out sequences that ended meanwhile (aborted, or finished by the step before)."""
        with lock:
            live = [c for c in chunks if c.seq.status is SequenceStatus.RUNNING]
            if not live:
                return {}, {}
            inputs = self.runner.prepare(SchedulerOutput(live), self.kv)
            number = self.kv.step_launched()
        pending = self._launch(inputs, number, lock)
        try:
            return pending.result()
        except BaseException:
            self._settle_device()
            raise
        finally:
            with lock:
                self.kv.step_done(number)

    def _launch(self, inputs: StepInputs, number: int, lock: AbstractContextManager) -> PendingStep:
        """Queue a step on the device, outside the lock; `number` is the KV cache
        manager's for it, so frees of its sequences' blocks wait until it is done."""
        try:
            pending = self.runner.launch(inputs)
        except BaseException:
            self._settle_device()
            with lock:
                self.kv.step_done(number)
            raise
        pending.step, pending.inputs = number, inputs
        return pending

    def _settle_device(self) -> None:
        """After a launch or a step raised: wait for whatever it queued on the device
        before its blocks may be handed out again."""
        if self.runner.device.type == "cuda":
            try:
                torch.cuda.synchronize(self.runner.device)
            except Exception:
                log.exception("the device failed while settling a failed step")

    def _may_launch_ahead(self, out: SchedulerOutput) -> bool:
        """Whether the step after `out` is surely `out`'s decodes one position on: no
        sequence waits or runs outside `out` (it would be scheduled next), none reaches
        max_tokens this step, and no row's sampling reads the token history (penalties
        and seeded draws need this step's token on the host). A sequence that stops on
        EOS or a stop string instead just has its extra token dropped by update()."""
        if not self._launch_ahead or self.scheduler.waiting:
            return False
        if len(self.scheduler.running) != len(out.chunks):
            return False
        for chunk in out.chunks:
            seq, sp = chunk.seq, chunk.seq.sampling
            if len(seq.output_token_ids) + 1 >= sp.max_tokens:
                return False
            if (
                sp.repetition_penalty != 1.0
                or sp.presence_penalty
                or sp.frequency_penalty
                or (sp.seed is not None and not sp.greedy)
            ):
                return False
        return True


def _mark_prompts(out: SchedulerOutput, hop: str) -> None:
    """hop_trace: `hop` for each sequence whose prompt the step computes part of."""
    if hop_trace.ENABLED:
        for chunk in out.chunks:
            if not chunk.seq.output_token_ids:
                hop_trace.mark(chunk.seq.request_id, hop)


def _next_decodes(out: SchedulerOutput) -> SchedulerOutput:
    """`out`'s decodes, each one position further: what a launched-ahead step runs."""
    return SchedulerOutput([ScheduledChunk(c.seq, c.start + 1, 1) for c in out.chunks])


def _matches(planned: StepInputs, out: SchedulerOutput) -> bool:
    """Whether inputs built ahead are exactly this schedule's: the same sequences, in
    order, each decoding the position that was planned for it."""
    chunks = out.chunks
    if planned.planned is None or len(planned.planned) != len(chunks):
        return False
    return all(
        c.num_tokens == 1 and c.seq.request_id == rid and c.start == pos
        for c, (rid, pos) in zip(chunks, planned.planned, strict=True)
    )
