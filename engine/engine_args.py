"""The engine's command-line flags, shared by `tandem generate`, the worker roles and the
engine benchmarks. Imports no torch until a config is built, so parsers stay light."""

from __future__ import annotations

import argparse


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="smollm2",
        help="smollm2, a shipped config name, or a checkpoint directory",
    )
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument(
        "--dtype",
        default=None,
        help="float32, bfloat16 or float16 (default: float32 on cpu, bfloat16 on cuda)",
    )
    p.add_argument(
        "--load-format",
        default="auto",
        choices=["auto", "safetensors", "dummy"],
        help="dummy: random weights (benchmarks with a shipped config)",
    )
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--num-blocks", type=int, default=0, help="KV blocks (0: from memory)")
    p.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="recompute every prompt: no sharing of cached KV blocks between requests",
    )
    p.add_argument(
        "--max-num-seqs", type=int, default=256, help="sequences in one continuous batch"
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="token budget of one step (prefill chunks + decodes)",
    )
    p.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=0,
        help="prompt tokens in one step, decodes not counted (0: the whole "
        "budget); smaller keeps steps that mix prefill into decodes short",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=8192,
        help="longest prompt + output (capped at the model's)",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="CUDA: share of GPU memory for weights, activations and KV cache",
    )
    p.add_argument(
        "--attention-backend",
        default="auto",
        choices=["auto", "torch", "triton"],
        help="auto: triton kernels on CUDA, torch elsewhere",
    )
    p.add_argument("--enforce-eager", action="store_true", help="CUDA: no CUDA graphs")
    p.add_argument(
        "--prefill-graph-tokens",
        type=int,
        default=512,
        help="CUDA: steps of up to this many tokens that are not plain decodes (short "
        "prompts, cached-prefix remainders, mixed steps) replay piecewise CUDA graphs; "
        "0: eager",
    )
    p.add_argument(
        "--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="random seed (generate: also the per-request sampling seed)",
    )


def engine_config_from_args(args: argparse.Namespace):
    from tandem.core.config import CacheConfig, SchedulerConfig
    from tandem.engine.engine import EngineConfig

    return EngineConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        load_format=args.load_format,
        seed=args.seed or 0,
        num_threads=args.threads,
        gpu_memory_utilization=args.gpu_memory_utilization,
        attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager,
        prefill_graph_tokens=args.prefill_graph_tokens,
        cache=CacheConfig(
            block_size=args.block_size,
            num_blocks=args.num_blocks,
            enable_prefix_caching=args.prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_prefill_tokens=args.max_prefill_tokens,
            max_model_len=args.max_model_len,
        ),
    )
