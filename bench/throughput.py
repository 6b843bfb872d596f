"""`tandem bench throughput`: offline, every request submitted at t=0, random token
ids, ignore_eos. Optionally the same workload through transformers `generate` in the
same run (`--peer hf`), reported as our output tokens/s over its."""

from __future__ import annotations

import argparse
import random
import time

import torch

from tandem.bench.results import write_result
from tandem.core.sampling_params import SamplingParams
from tandem.engine.engine import Engine
from tandem.engine.llm import LLM


def make_workload(
    n: int, input_len: int, output_len: int, vocab: int, seed: int, uniform: tuple[int, int] | None
) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    jobs = []
    for _ in range(n):
        i = rng.randint(*uniform) if uniform else input_len
        o = rng.randint(*uniform) if uniform else output_len
        jobs.append(([rng.randrange(vocab) for _ in range(i)], o))
    return jobs


def run_ours(llm: LLM, jobs: list[tuple[list[int], int]], progress: bool = False) -> float:
    params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for _, o in jobs]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate([p for p, _ in jobs], params, progress=progress)
    elapsed = time.perf_counter() - t0
    assert all(len(o.token_ids) == n for o, (_, n) in zip(outs, jobs, strict=True))
    return elapsed


def run(args: argparse.Namespace, engine: Engine) -> dict:
    llm = LLM.__new__(LLM)
    llm.engine = engine
    uniform = (args.min_len, args.max_len) if args.uniform else None
    vocab = engine.model_config.vocab_size
    jobs = make_workload(args.num_requests, args.input_len, args.output_len, vocab, 0, uniform)
    run_ours(llm, make_workload(min(32, args.num_requests), 64, 16, vocab, 1, None))  # warm up
    elapsed = run_ours(llm, jobs, progress=True)
    n_in = sum(len(p) for p, _ in jobs)
    n_out = sum(o for _, o in jobs)
    metrics = {
        "elapsed_s": round(elapsed, 3),
        "total_tokens_per_s": round((n_in + n_out) / elapsed, 1),
        "output_tokens_per_s": round(n_out / elapsed, 1),
        "requests_per_s": round(len(jobs) / elapsed, 3),
    }
    if args.peer == "hf":
        from tandem.bench.hf_peer import hf_output_tokens_per_s

        engine.runner.release_gpu_memory()  # the peer needs the room our KV cache had
        peer = hf_output_tokens_per_s(
            engine.model_dir, jobs, engine.runner.dtype, args.peer_batch_sizes, args.peer_requests
        )
        metrics.update(
            {
                "hf_output_tokens_per_s": round(peer["output_tokens_per_s"], 1),
                "hf_batch_size": peer["batch_size"],
                "hf_requests": peer["requests"],
                "speedup_vs_hf": round(
                    metrics["output_tokens_per_s"] / peer["output_tokens_per_s"], 2
                ),
            }
        )
    params = {
        "num_requests": args.num_requests,
        "input_len": f"{args.min_len}..{args.max_len}" if uniform else args.input_len,
        "output_len": f"{args.min_len}..{args.max_len}" if uniform else args.output_len,
        "batch_size": engine.scheduler.config.max_num_seqs,
        "max_num_batched_tokens": engine.scheduler.config.max_num_batched_tokens,
        "dtype": str(engine.runner.dtype),
        "load_format": engine.config.load_format,
        "peer": args.peer,
    }
    write_result("throughput", engine.name, params, metrics, args.out_dir)
    return metrics
