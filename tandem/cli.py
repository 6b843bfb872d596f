"""`tandem` command line: serve | gateway | prefill | decode | worker | generate | bench.

Each subcommand's flags map onto the typed configs of the role it starts; heavy imports
happen inside the handlers so `tandem --help` and the gateway never load torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _add_engine_args(p: argparse.ArgumentParser) -> None:
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


def _cmd_generate(args: argparse.Namespace) -> int:
    from tandem.core.sampling_params import SamplingParams
    from tandem.engine.llm import LLM

    sampling = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
        stop_token_ids=tuple(args.stop_token_id or ()),
    )
    sampling.validate()
    llm = LLM(config=engine_config_from_args(args))
    prompts: list[str | list[int]] = list(args.prompt or [])
    if args.prompt_token_ids:
        prompts += [json.loads(s) for s in args.prompt_token_ids]
    if not prompts:
        raise ValueError("give at least one --prompt or --prompt-token-ids")
    if args.chat:
        prompts = [
            llm.tokenizer.encode_chat([{"role": "user", "content": p}]) if isinstance(p, str) else p
            for p in prompts
        ]
    for out in llm.generate(prompts, sampling):
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt_token_ids": out.prompt_token_ids,
                        "token_ids": out.token_ids,
                        "text": out.text,
                        "finish_reason": out.finish_reason,
                    },
                    ensure_ascii=False,
                )
            )
        else:
            print(f"--- {out.finish_reason}, {len(out.token_ids)} tokens\n{out.text}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tandem",
        description="Disaggregated LLM inference",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING, ...")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser(
        "generate",
        help="run the engine in-process on some prompts",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_engine_args(gen)
    gen.add_argument("--prompt", action="append", help="a text prompt (repeatable)")
    gen.add_argument(
        "--prompt-token-ids", action="append", help="a JSON list of token ids (repeatable)"
    )
    gen.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--stop-token-id", type=int, action="append")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    gen.set_defaults(func=_cmd_generate)

    from tandem import roles
    from tandem.bench.cli import add_bench_parser

    roles.add_role_parsers(sub, _add_engine_args)
    add_bench_parser(sub, _add_engine_args, engine_config_from_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args) or 0
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"tandem {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
