"""The prompt sets of `tandem bench serve --workload`: what the requests ask, and when.

- random: independent prompts of random token ids (serve_client.make_prompts), Poisson
  arrivals; no prompt shares a prefix with another.
- shared-prefix: one system prompt of --shared-prefix-len tokens, then --input-len
  tokens of each request's own (the prefix cache's best case: one long prefix, many
  short questions), Poisson arrivals.
- multi-turn: conversations of --turns turns; turn t's prompt is the conversation so
  far (every earlier prompt part, and a stand-in of --output-len tokens for each earlier
  answer) plus --input-len new tokens. Conversations start with Poisson arrivals at the
  rate / turns; each next turn follows --turn-gap seconds after the previous one was
  sent (a user's think time). The stand-in answers are fixed tokens, not the model's
  (a dummy model's answers mean nothing, and fixed ones keep the runs comparable), so
  only the prompt parts of earlier turns can be found cached: `ideal_hit_rate` says
  what share of all prompt tokens that is.

All are seeded by a string: the same arguments give the same prompts in every process.
"""

from __future__ import annotations

import argparse
import math
import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tandem.bench.serve_client import Prompt

WORKLOADS = ("random", "shared-prefix", "multi-turn")


def add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workload",
        default="random",
        choices=WORKLOADS,
        help="random prompts, one shared system prompt, or multi-turn conversations",
    )
    p.add_argument(
        "--shared-prefix-len",
        type=int,
        default=2000,
        help="shared-prefix: tokens of the system prompt every request starts with",
    )
    p.add_argument("--turns", type=int, default=6, help="multi-turn: turns per conversation")
    p.add_argument(
        "--turn-gap",
        type=float,
        default=2.0,
        help="multi-turn: seconds between a user's turns",
    )


def workload_prompts(
    args: argparse.Namespace, n: int, rate: float, seed: str
) -> tuple[list[Prompt], list[float], float]:
    """`n` prompts of `args.workload`, their arrival offsets, and the share of prompt
    tokens an ideal prefix cache would serve."""
    # Imported here: serve_client imports grpc, and the CLI's parsers build without it.
    from tandem.bench.serve_client import Prompt, arrival_times, make_prompts

    vocab, out_len = args.vocab_size, args.output_len
    if args.workload == "random":
        prompts = make_prompts(n, args.input_len, out_len, vocab, seed, args.range_ratio)
        return prompts, arrival_times(n, rate, seed), 0.0
    rng = random.Random(seed)

    def tokens(k: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(k)]

    if args.workload == "shared-prefix":
        system = tokens(args.shared_prefix_len)
        prompts = [Prompt(system + tokens(args.input_len), out_len) for _ in range(n)]
        shared = args.shared_prefix_len * (n - 1)
        return prompts, arrival_times(n, rate, seed), shared / _total(prompts)
    if args.turns < 1 or args.turn_gap < 0:
        raise ValueError("--turns must be >= 1 and --turn-gap >= 0")
    users = math.ceil(n / args.turns)
    starts = arrival_times(users, rate / args.turns, seed)
    timed: list[tuple[float, Prompt]] = []
    for start in starts:
        history: list[int] = []
        for turn in range(args.turns):
            if turn:
                history = history + tokens(out_len)  # the earlier answer's stand-in
            history = history + tokens(args.input_len)
            timed.append((start + turn * args.turn_gap, Prompt(list(history), out_len)))
    timed.sort(key=lambda item: item[0])
    timed = timed[:n]
    prompts = [p for _, p in timed]
    return prompts, [t for t, _ in timed], _multi_turn_ideal(prompts, args)


def _multi_turn_ideal(prompts: list[Prompt], args: argparse.Namespace) -> float:
    """Share of prompt tokens that are the prompt parts of the same conversation's
    earlier turns: each turn adds input_len new and output_len stand-in tokens."""
    reusable = 0
    for p in prompts:
        if len(p.token_ids) > args.input_len:  # a later turn: the previous prompt leads it
            reusable += len(p.token_ids) - args.input_len - args.output_len
    return reusable / _total(prompts)


def _total(prompts: list[Prompt]) -> int:
    return max(1, sum(len(p.token_ids) for p in prompts))
