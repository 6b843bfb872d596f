"""`tandem bench prefix-step`: where a cached-prefix request's first token goes, in the
engine alone (no service): one request of `--shared-prefix-len` + `--input-len` tokens
after a first one has cached the shared part, timed step by step, with caching on and
beside a running decode batch. Answers whether a TTFT floor under the service is the
engine's (compute, eager launches) or the service's (queues, hops).
"""

from __future__ import annotations

import argparse
import random
import time
import uuid

import torch

from tandem.bench.results import write_result
from tandem.core.sampling_params import SamplingParams
from tandem.core.sequence import Sequence
from tandem.engine.engine import Engine


def _sync(engine: Engine) -> None:
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize()


def _first_token_ms(engine: Engine, prompt: list[int]) -> tuple[float, int]:
    """Milliseconds from add to the request's first token, and the steps it took, while
    whatever else the engine runs keeps running."""
    rid = uuid.uuid4().hex
    sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    _sync(engine)
    t0 = time.perf_counter()
    engine.add(Sequence(rid, prompt, sp))
    steps = 0
    while True:
        _, got = engine.step()
        steps += 1
        if any(s.request_id == rid for s in got):
            return (time.perf_counter() - t0) * 1e3, steps


def _decode_batch(engine: Engine, batch: int, rng: random.Random) -> None:
    sp = SamplingParams(max_tokens=engine.max_model_len - 64, temperature=0.0, ignore_eos=True)
    vocab = engine.model_config.vocab_size
    for _ in range(batch):
        engine.add(Sequence(uuid.uuid4().hex, [rng.randrange(vocab) for _ in range(64)], sp))
    while engine.scheduler.waiting or any(
        s.num_uncomputed_tokens > 1 for s in engine.scheduler.running
    ):
        engine.step()
    for _ in range(4):
        engine.step()


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def _decode_step_ms(engine: Engine, n: int = 10) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - t0) * 1e3)
    return _median(times)


def run(args: argparse.Namespace, engine: Engine) -> dict:
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size

    def prompt(shared: list[int]) -> list[int]:
        return shared + [rng.randrange(vocab) for _ in range(args.input_len)]

    figures: dict[str, float] = {}
    for label, batch in (("alone", 0), ("beside_decodes", args.decode_batch)):
        if batch:
            _decode_batch(engine, batch, rng)
            figures["decode_step_ms"] = round(_decode_step_ms(engine), 3)
        cold, hot, uncached_short = [], [], []
        for i in range(args.repeats + 1):
            shared = [rng.randrange(vocab) for _ in range(args.shared_prefix_len)]
            cold_ms, _ = _first_token_ms(engine, prompt(shared))  # caches `shared`
            hot_ms, hot_steps = _first_token_ms(engine, prompt(shared))
            short_ms, _ = _first_token_ms(engine, prompt([]))
            if i:  # the first round warms up the shapes
                cold.append(cold_ms)
                hot.append(hot_ms)
                uncached_short.append(short_ms)
        figures[f"{label}_uncached_full_ms"] = round(_median(cold), 3)
        figures[f"{label}_cached_prefix_ms"] = round(_median(hot), 3)
        figures[f"{label}_cached_prefix_steps"] = hot_steps
        figures[f"{label}_short_prompt_only_ms"] = round(_median(uncached_short), 3)
        print(label, {k: v for k, v in figures.items() if k.startswith(label)}, flush=True)
    if args.profile and engine.runner.device.type == "cuda":
        shared = [rng.randrange(vocab) for _ in range(args.shared_prefix_len)]
        _first_token_ms(engine, prompt(shared))
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            _first_token_ms(engine, prompt(shared))
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    params = {
        k: getattr(args, k)
        for k in ("shared_prefix_len", "input_len", "decode_batch", "repeats", "block_size")
    }
    params["prefix_caching"] = engine.kv.enable_prefix_caching
    write_result(
        "prefix-step",
        engine.name,
        params,
        figures,
        args.out_dir,
        label=f"{args.shared_prefix_len}-shared-{args.input_len}-own",
    )
    return figures
