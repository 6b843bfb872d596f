"""`tandem bench latency`: one batch, timed step by step.

Reports decode tokens/s with prefill excluded (default: batch 1, 128-token prompt,
256 new tokens), end-to-end seconds of vLLM's default latency case (batch 8, 32 in,
128 out), and, on CUDA, the ceiling beside them: weight bytes over the measured copy
bandwidth, and the linear layers alone in a CUDA graph.
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

E2E_RUNS = 3


def _sync(engine: Engine) -> None:
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize()


def host_breakdown_ms(engine: Engine, steps: int = 20) -> dict[str, float]:
    """Where one decode step's time goes: scheduling and input preparation on the host,
    the device step (launch to tokens on the host), and applying the results."""
    sched, runner = engine.scheduler, engine.runner
    totals = {"schedule": 0.0, "prepare": 0.0, "execute": 0.0, "update": 0.0}
    done = 0
    while sched.has_work and done < steps:
        t0 = time.perf_counter()
        out = sched.schedule()
        t1 = time.perf_counter()
        inputs = runner.prepare(out, engine.kv)
        t2 = time.perf_counter()
        sampled, logprobs = runner.execute(out, inputs)
        t3 = time.perf_counter()
        sched.update(out, sampled, logprobs)
        t4 = time.perf_counter()
        if all(c.num_tokens == 1 for c in out.chunks):
            for key, dt in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                totals[key] += dt
            done += 1
    return {f"{k}_ms": round(v / max(done, 1) * 1e3, 4) for k, v in totals.items()}


def run_batch(
    engine: Engine, batch: int, input_len: int, output_len: int, seed: int
) -> tuple[float, list[float]]:
    """Prefill seconds and the list of decode step seconds for one batch."""
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    sp = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    for _ in range(batch):
        engine.add(Sequence(uuid.uuid4().hex, [rng.randrange(vocab) for _ in range(input_len)], sp))
    _sync(engine)
    prefill_s = 0.0
    decode_steps: list[float] = []
    while engine.has_work:
        t0 = time.perf_counter()
        out, _ = engine.step()
        elapsed = time.perf_counter() - t0  # step() ends on the host copy of the tokens
        if out.chunks and all(c.num_tokens == 1 for c in out.chunks):
            decode_steps.append(elapsed)
        else:
            prefill_s += elapsed
    return prefill_s, decode_steps


def run(args: argparse.Namespace, engine: Engine) -> dict:
    for _ in range(args.warmup):
        run_batch(engine, args.batch_size, args.input_len, min(args.output_len, 16), 1)
    prefill_s, steps = run_batch(engine, args.batch_size, args.input_len, args.output_len, 0)
    step_s = sorted(steps)[len(steps) // 2]
    decode_tps = args.batch_size * len(steps) / sum(steps)
    # vLLM's latency case: warmed up once at its own shapes (kernels specialise on them),
    # then the median of a few timed runs.
    e2e_runs = []
    for i in range(1 + E2E_RUNS):
        t0 = time.perf_counter()
        run_batch(engine, args.e2e_batch_size, args.e2e_input_len, args.e2e_output_len, 2 + i)
        e2e_runs.append(time.perf_counter() - t0)
    e2e_s = sorted(e2e_runs[1:])[E2E_RUNS // 2]
    # Step anatomy at the measured batch size, for NOTES.md.
    rng = random.Random(3)
    sp = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    for _ in range(args.batch_size):
        engine.add(Sequence(uuid.uuid4().hex, [rng.randrange(100) for _ in range(16)], sp))
    engine.step()  # prefill
    breakdown = host_breakdown_ms(engine)
    while engine.has_work:
        engine.step()
    metrics = {
        "output_tokens_per_s": round(decode_tps, 2),
        "decode_step_ms_median": round(step_s * 1e3, 3),
        "prefill_ms": round(prefill_s * 1e3, 2),
        "e2e_s": round(e2e_s, 4),
        "e2e_runs_s": [round(t, 4) for t in e2e_runs],
        "step_breakdown": breakdown,
    }
    if engine.runner.device.type == "cuda":
        from tandem.bench.ceiling import (
            copy_bandwidth_bytes_per_s,
            linear_layers_step_s,
            weight_bytes,
        )

        bw = copy_bandwidth_bytes_per_s(nbytes=256 << 20)  # fits beside the KV cache
        wbytes = weight_bytes(engine.model_config, engine.runner.dtype)
        cublas_s = linear_layers_step_s(engine.runner.model, args.batch_size)
        ours_s = linear_layers_step_s(engine.runner.model, args.batch_size, engine_ops=True)
        linear_s = min(cublas_s, ours_s)
        metrics.update(
            {
                "copy_bandwidth_tb_s": round(bw / 1e12, 3),
                "weight_bytes_over_bandwidth_ms": round(wbytes / bw * 1e3, 3),
                # The ceiling: the linear layers alone as cuBLAS runs them...
                "linear_layers_graph_ms": round(cublas_s * 1e3, 3),
                # ...and as the engine runs them (its GEMV at batch 1); the faster counts.
                "linear_layers_engine_graph_ms": round(ours_s * 1e3, 3),
                "ceiling_tokens_per_s": round(args.batch_size / linear_s, 2),
            }
        )
        print(
            f"decode step {step_s * 1e3:.2f} ms; ceiling: weights/bandwidth "
            f"{wbytes / bw * 1e3:.2f} ms, linear layers alone {cublas_s * 1e3:.2f} ms "
            f"(cuBLAS), {ours_s * 1e3:.2f} ms (engine)"
        )
    params = {
        "num_requests": args.batch_size,
        "batch_size": args.batch_size,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "e2e_batch_size": args.e2e_batch_size,
        "e2e_input_len": args.e2e_input_len,
        "e2e_output_len": args.e2e_output_len,
        "dtype": str(engine.runner.dtype),
        "load_format": engine.config.load_format,
        "cuda_graphs": engine.runner.graphs is not None,
    }
    write_result("latency", engine.name, params, metrics, args.out_dir)
    return metrics
