"""Tiny builders for scheduler tests: no model, no torch."""

from __future__ import annotations

from tandem.core.config import SchedulerConfig
from tandem.core.kv_cache_manager import KVCacheManager
from tandem.core.sampling_params import SamplingParams
from tandem.core.scheduler import Scheduler
from tandem.core.sequence import Sequence


def create_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 16,
    max_num_batched_tokens: int = 64,
    max_model_len: int = 256,
    requeue_preempted: bool = True,
    eos: frozenset[int] = frozenset({0}),
    max_prefill_tokens: int = 0,
) -> Scheduler:
    cfg = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        max_prefill_tokens=max_prefill_tokens,
    )
    return Scheduler(cfg, KVCacheManager(num_blocks, block_size), eos, requeue_preempted)


def create_requests(
    n: int, prompt_len: int = 8, max_tokens: int = 4, prefix: str = "r", **sampling
) -> list[Sequence]:
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **sampling)
    return [Sequence(f"{prefix}{i}", list(range(1, prompt_len + 1)), sp) for i in range(n)]


def run_step(sched: Scheduler, token: int = 7):
    """Schedule one step and pretend the model sampled `token` for every sampling chunk."""
    out = sched.schedule()
    sampled = {c.seq.request_id: token for c in out.chunks if c.samples}
    return out, sched.update(out, sampled)
