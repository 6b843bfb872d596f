"""The offline baseline of `tandem bench serve --offline-baseline`: the in-process engine
on exactly the prompts the service gets at rate inf, timed by bench/throughput.py.

It runs as a subprocess (`python -m tandem.bench.serve_offline ...`) before any service starts,
so the GPU is whole for it and free again once it exits.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tandem.bench.serve_client import make_prompts

REPO_ROOT = Path(__file__).resolve().parent.parent


def add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-prompts", type=int, required=True)
    p.add_argument("--input-len", type=int, required=True)
    p.add_argument("--output-len", type=int, required=True)
    p.add_argument("--range-ratio", type=float, default=0.0)
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--prompt-seed", required=True, help="the string seed of the prompts")


def run_offline_baseline(
    engine_flags: list[str],
    workload_flags: list[str],
    cuda_visible_devices: str | None,
    timeout_s: float,
) -> dict:
    """Run the baseline in a child process and return its figures."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    if cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    with tempfile.TemporaryDirectory(prefix="tandem-offline-") as tmp:
        out = Path(tmp) / "offline.json"
        cmd = [
            sys.executable,
            "-m",
            "tandem.bench.serve_offline",
            *engine_flags,
            *workload_flags,
            "--out",
            str(out),
        ]
        print("offline baseline: " + " ".join(cmd), flush=True)
        try:
            done = subprocess.run(cmd, env=env, cwd=REPO_ROOT, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the offline baseline took over {timeout_s:.0f}s") from None
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"the offline baseline failed (status {done.returncode})")
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    # Imported here: the parent (`tandem bench serve`) imports this module without torch.
    import time

    from tandem.bench.throughput import make_workload, run_ours
    from tandem.engine.engine_args import add_engine_args, engine_config_from_args
    from tandem.engine.llm import LLM

    parser = argparse.ArgumentParser(prog="python -m tandem.bench.serve_offline")
    add_engine_args(parser)
    add_workload_args(parser)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    prompts = make_prompts(
        args.num_prompts,
        args.input_len,
        args.output_len,
        args.vocab_size,
        args.prompt_seed,
        args.range_ratio,
    )
    jobs = [(p.token_ids, p.output_len) for p in prompts]
    t0 = time.perf_counter()
    llm = LLM(config=engine_config_from_args(args))
    startup_s = time.perf_counter() - t0
    run_ours(llm, make_workload(min(32, len(jobs)), 64, 16, args.vocab_size, 1, None))
    elapsed = run_ours(llm, jobs, progress=True)
    n_in = sum(len(p) for p, _ in jobs)
    n_out = sum(o for _, o in jobs)
    args.out.write_text(
        json.dumps(
            {
                "num_prompts": len(jobs),
                "startup_s": round(startup_s, 1),
                "elapsed_s": round(elapsed, 3),
                "request_throughput": round(len(jobs) / elapsed, 3),
                "output_throughput": round(n_out / elapsed, 1),
                "total_token_throughput": round((n_in + n_out) / elapsed, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
