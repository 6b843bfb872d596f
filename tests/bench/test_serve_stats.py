"""`tandem bench serve` on fake data: statistics, SLO counting, workload and schedule,
the load loop, the SSE reader, the command lines of each mode, and the ratios."""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import time

import numpy as np
import pytest

from tandem.bench.serve import _add_attainment_ratios, _add_ratios, parse_rates, prompts_for
from tandem.bench.serve_client import (
    HttpBackend,
    Prompt,
    RequestResult,
    arrival_times,
    make_prompts,
    run_load,
)
from tandem.bench.serve_service import engine_argv, mode_argv, shares_one_gpu
from tandem.bench.serve_stats import (
    failure,
    format_table,
    meets_slos,
    parse_slo_sets,
    parse_slos,
    percentile,
    prompts_prefilled,
    request_times,
    summarize_ms,
    summarize_run,
)
from tandem.engine.engine_args import add_engine_args


def result(
    start: float,
    chunks: list[tuple[float, int]],
    end: float,
    expected: int | None = None,
    error: str = "",
    prompt_len: int = 10,
) -> RequestResult:
    tokens = sum(n for _, n in chunks)
    return RequestResult(
        prompt_len,
        tokens if expected is None else expected,
        start,
        end,
        list(chunks),
        tokens,
        error,
    )


def test_percentile_matches_numpy_linear_interpolation():
    rng = random.Random(3)
    for n in (1, 2, 5, 101):
        values = sorted(rng.uniform(0, 10) for _ in range(n))
        for q in (0, 25, 50, 90, 99, 100):
            assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summarize_ms_in_milliseconds_and_none_when_empty():
    assert summarize_ms([]) is None
    s = summarize_ms([0.001 * i for i in range(1, 101)])  # 1..100 ms
    assert s == {"mean": 50.5, "p50": 50.5, "p90": 90.1, "p99": 99.01}


def test_ttft_tpot_e2e_and_itl_spread_over_the_tokens_of_a_chunk():
    # sent at 10.0; first token at 10.5; one token at 10.7; three at 11.3; end at 11.4
    t = request_times(result(10.0, [(10.5, 1), (10.7, 1), (11.3, 3)], 11.4))
    assert t.ttft == pytest.approx(0.5)
    assert t.e2e == pytest.approx(1.4)
    assert t.tpot == pytest.approx((1.4 - 0.5) / 4)
    assert t.itls == pytest.approx([0.2, 0.2, 0.2, 0.2])


def test_first_chunk_extra_tokens_have_no_gap_and_one_token_has_no_tpot():
    t = request_times(result(0.0, [(1.0, 3), (2.0, 1)], 2.0))
    assert t.itls == pytest.approx([1.0])
    assert t.tpot == pytest.approx(1.0 / 3)
    single = request_times(result(0.0, [(0.3, 1)], 0.4))
    assert single.tpot is None and single.itls == []


def test_a_short_or_failed_request_counts_as_failed():
    assert failure(result(0, [(1, 4)], 2)) is None
    assert "3 tokens of 4" in failure(result(0, [(1, 3)], 2, expected=4))
    assert failure(result(0, [(1, 5)], 2, expected=4)) is not None
    assert failure(result(0, [], 1, error="UNAVAILABLE: gone")) == "UNAVAILABLE: gone"


def test_goodput_counts_completed_requests_within_every_slo():
    slos = parse_slos(["ttft:100", "tpot:50"])
    assert slos == {"ttft": 100.0, "tpot": 50.0}
    fast = result(0.0, [(0.05, 1), (0.09, 1), (0.13, 1)], 0.13)  # ttft 50, tpot 40
    slow_first = result(0.0, [(0.2, 1), (0.22, 1), (0.24, 1)], 0.24)  # ttft 200
    slow_steps = result(0.0, [(0.05, 1), (0.15, 1), (0.25, 1)], 0.25)  # tpot 100
    edge = result(0.0, [(0.1, 1), (0.15, 1), (0.2, 1)], 0.2)  # exactly at both limits
    short = result(0.0, [(0.01, 1)], 0.02, expected=3)  # fast but failed
    assert [meets_slos(request_times(r), slos) for r in (fast, slow_first, slow_steps, edge)] == [
        True,
        False,
        False,
        True,
    ]
    row = summarize_run([fast, slow_first, slow_steps, edge, short], 2.0, slos)
    assert (row["completed"], row["failed"], row["goodput_requests"]) == (4, 1, 2)
    assert row["goodput"] == 1.0
    assert row["request_throughput"] == 2.0
    assert row["output_throughput"] == 6.0  # 12 tokens of completed requests in 2 s
    assert row["total_token_throughput"] == 26.0  # plus 4 prompts of 10
    assert row["errors"] == {"returned 1 tokens of 3 asked": 1}
    assert set(row["ttft_ms"]) == {"mean", "p50", "p90", "p99"}
    assert summarize_run([fast], 1.0, {})["goodput"] is None
    assert "ITL p99" in format_table([("1p1d", "inf", row)])


@pytest.mark.parametrize("bad", ["ttft", "itl:5", "ttft:x", "tpot:0"])
def test_bad_slos_are_refused(bad):
    with pytest.raises(ValueError):
        parse_slos([bad])


def test_poisson_schedule_is_reproducible_with_the_right_mean():
    times = arrival_times(20000, 4.0, "0:4")
    assert times == arrival_times(20000, 4.0, "0:4")
    assert times != arrival_times(20000, 4.0, "1:4")
    assert times[0] == 0.0 and times == sorted(times)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert sum(gaps) / len(gaps) == pytest.approx(0.25, rel=0.05)
    # exponential gaps: P(gap < mean) = 1 - 1/e
    assert sum(g < 0.25 for g in gaps) / len(gaps) == pytest.approx(1 - math.exp(-1), abs=0.02)
    assert arrival_times(3, math.inf, "x") == [0.0, 0.0, 0.0]


def test_prompts_are_seeded_in_the_vocabulary_and_of_the_asked_lengths():
    a = make_prompts(50, 16, 8, 100, "7:inf")
    assert a == make_prompts(50, 16, 8, 100, "7:inf")
    assert a != make_prompts(50, 16, 8, 100, "7:4")
    assert all(len(p.token_ids) == 16 and p.output_len == 8 for p in a)
    assert all(0 <= t < 100 for p in a for t in p.token_ids)
    ranged = make_prompts(200, 100, 10, 100, "s", range_ratio=0.5)
    assert {len(p.token_ids) for p in ranged} <= set(range(50, 151))
    assert len({len(p.token_ids) for p in ranged}) > 10
    assert {p.output_len for p in ranged} <= set(range(5, 16))
    with pytest.raises(ValueError):
        make_prompts(1, 4, 4, 10, "s", range_ratio=1.0)


def test_run_load_sends_everything_and_respects_the_concurrency_cap():
    state = {"now": 0, "most": 0}

    async def send(prompt: Prompt, r: RequestResult) -> None:
        state["now"] += 1
        state["most"] = max(state["most"], state["now"])
        r.start = time.perf_counter()
        await asyncio.sleep(0.01)
        r.chunks.append((time.perf_counter(), prompt.output_len))
        r.output_tokens = prompt.output_len
        r.end = time.perf_counter()
        state["now"] -= 1

    prompts = make_prompts(12, 4, 3, 50, "c")
    results, duration = asyncio.run(run_load(send, prompts, [0.0] * 12, max_concurrency=3))
    assert state["most"] == 3
    assert len(results) == 12 and all(failure(r) is None for r in results)
    assert [r.prompt_len for r in results] == [4] * 12
    assert duration >= max(r.end for r in results) - min(r.start for r in results)


def _events(lines: list[bytes], result: RequestResult) -> None:
    async def go() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(b"".join(lines))
        reader.feed_eof()
        await HttpBackend._events(reader, result)

    asyncio.run(go())


def test_sse_reader_counts_text_events_and_takes_usage():
    r = RequestResult(3, 2)
    _events(
        [
            b'data: {"choices": [{"text": "a"}]}\n\n',
            b": keep-alive\n\n",
            b'data: {"choices": [{"text": ""}]}\n\n',
            b'data: {"choices": [{"text": "b", "finish_reason": "length"}]}\n\n',
            b'data: {"choices": [], "usage": {"completion_tokens": 2}}\n\n',
            b"data: [DONE]\n\n",
        ],
        r,
    )
    assert len(r.chunks) == 2 and r.output_tokens == 2
    with pytest.raises(ValueError, match="boom"):
        _events(
            [b'data: {"error": {"message": "boom"}}\n\n', b"data: [DONE]\n\n"], RequestResult(3, 2)
        )
    with pytest.raises(ValueError, match="DONE"):
        _events([b'data: {"choices": [{"text": "a"}]}\n\n'], RequestResult(3, 2))


def test_mode_command_lines_place_workers_on_gpus():
    assert mode_argv("colocated", 2, True) == [
        "--colocated-workers",
        "2",
        "--colocated-gpus",
        "0,1",
    ]
    assert mode_argv("1p1d", 2, True)[-4:] == ["--prefill-gpus", "0", "--decode-gpus", "1"]
    assert mode_argv("1p1d", 1, True)[-4:] == ["--prefill-gpus", "0", "--decode-gpus", "0"]
    assert mode_argv("1p1d", 1, False) == ["--prefill-workers", "1", "--decode-workers", "1"]
    assert mode_argv("1p1d-local", 2, True, (150.0, 2, 0)) == [
        "--prefill-workers",
        "1",
        "--decode-workers",
        "1",
        "--prefill-gpus",
        "0",
        "--decode-gpus",
        "1",
        "--local-prefill-after-ms",
        "150",
        "--max-local-prefills",
        "2",
    ]
    assert mode_argv("1p1d-local", 2, True, (150.0, 2, 512))[-2:] == [
        "--local-prefill-tokens",
        "512",
    ]
    assert "--local-prefill-after-ms" not in mode_argv("1p1d", 2, True, (150.0, 2, 512))
    assert shares_one_gpu("1p1d", 1, True) and not shares_one_gpu("1p1d", 2, True)
    assert shares_one_gpu("1p1d-local", 1, True)
    with pytest.raises(ValueError):
        mode_argv("1p1d-local", 2, True)  # without its local prefill settings
    assert not shares_one_gpu("colocated", 1, True)
    with pytest.raises(ValueError):
        mode_argv("2p2d", 2, True)


def test_engine_flags_travel_with_overrides():
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(
        ["--model", "llama-3.1-8b", "--load-format", "dummy", "--enforce-eager"]
    )
    argv = engine_argv(args, add_engine_args, gpu_memory_utilization=0.45)
    assert argv[argv.index("--model") + 1] == "llama-3.1-8b"
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.45"
    assert "--enforce-eager" in argv and "--device" not in argv  # unset: the child's default
    assert parser.parse_args(argv).load_format == "dummy"
    assert "--no-prefix-caching" not in argv  # on by default: nothing to pass
    off = engine_argv(parser.parse_args(["--no-prefix-caching"]), add_engine_args)
    assert "--no-prefix-caching" in off and not parser.parse_args(off).prefix_caching


def test_rates_and_prompt_counts():
    assert parse_rates("1, 4,inf,0.5") == [("1", 1.0), ("4", 4.0), ("inf", math.inf), ("0.5", 0.5)]
    with pytest.raises(ValueError):
        parse_rates("0")
    args = argparse.Namespace(num_prompts=500, duration=30.0, min_prompts=20)
    assert [prompts_for(r, args) for r in (0.1, 4.0, 100.0, math.inf)] == [20, 120, 500, 500]
    args.duration = 0.0
    assert prompts_for(1.0, args) == 500


def test_ratios_of_served_to_offline_and_of_1p1d_to_two_colocated():
    def row(goodput, total, req_s, ttft_p99, tpot_p99, failed=0):
        return {
            "goodput": goodput,
            "total_token_throughput": total,
            "request_throughput": req_s,
            "completed": 10,
            "failed": failed,
            "ttft_ms": {"p99": ttft_p99},
            "tpot_ms": {"p99": tpot_p99},
        }

    slos = {"ttft": 2000.0, "tpot": 40.0}
    metrics = {
        "offline": {"total_token_throughput": 1000.0},
        "modes": {
            "1p1d": {
                "rates": {
                    "4": row(3.0, 500.0, 3.9, 900, 20),
                    "8": row(3.5, 700.0, 7.6, 1500, 39),
                    "inf": row(2.0, 800.0, 9.0, 9000, 30),
                }
            },
            "colocated": {
                "rates": {
                    "4": row(2.0, 400.0, 4.0, 300, 30),
                    "8": row(3.0, 600.0, 7.9, 500, 45),
                    "inf": row(4.0, 900.0, 9.5, 8000, 60, failed=1),
                }
            },
        },
    }
    _add_ratios(metrics, ["1p1d", "colocated"], gpus=2, slos=slos)
    assert metrics["served_vs_offline_mode"] == "1p1d"
    assert metrics["served_vs_offline_throughput_ratio"] == 0.8
    assert metrics["modes"]["colocated"]["served_vs_offline_throughput_ratio"] == 0.9
    # p99 definition: 1p1d holds both SLOs up to 7.6 req/s; colocated only at 4.0 (at 8
    # its TPOT p99 is over 40 ms, at inf a request failed).
    assert metrics["p99_slo_goodput"] == {"1p1d": 7.6, "colocated": 4.0}
    assert metrics["goodput_ratio_1p1d_vs_2_colocated"] == 1.9
    assert metrics["request_goodput_ratio_1p1d_vs_2_colocated"] == 0.875
    assert metrics["goodput_ratio_1p1d_vs_2_colocated_by_rate"] == {
        "4": 1.5,
        "8": 1.167,
        "inf": 0.5,
    }
    assert "goodput_ratio_1p1d_local_vs_2_colocated" not in metrics
    # With the local-prefill mode beside them, each disaggregated mode gets its ratios.
    metrics["modes"]["1p1d-local"] = {
        "rates": {
            "4": row(3.9, 500.0, 3.9, 800, 22),
            "8": row(7.8, 700.0, 7.8, 900, 30),
            "inf": row(2.0, 800.0, 9.0, 9000, 30),
        }
    }
    _add_ratios(metrics, ["1p1d", "1p1d-local", "colocated"], gpus=2, slos=slos)
    assert metrics["p99_slo_goodput"] == {"1p1d": 7.6, "1p1d-local": 7.8, "colocated": 4.0}
    assert metrics["goodput_ratio_1p1d_vs_2_colocated"] == 1.9
    assert metrics["goodput_ratio_1p1d_local_vs_2_colocated"] == 1.95
    assert metrics["request_goodput_ratio_1p1d_local_vs_2_colocated"] == 1.95
    assert metrics["goodput_ratio_1p1d_local_vs_2_colocated_by_rate"] == {
        "4": 1.95,
        "8": 2.6,
        "inf": 0.5,
    }
    one_gpu = {"modes": {"1p1d": {"rates": {}}, "colocated": {"rates": {}}}}
    _add_ratios(one_gpu, ["1p1d", "colocated"], gpus=1, slos=slos)
    assert "goodput_ratio_1p1d_vs_2_colocated" not in one_gpu


def test_prompts_prefilled_per_role_come_from_the_gateways_worker_gauges():
    from tandem.core.protocol import WorkerInfo
    from tandem.gateway.metrics import GatewayMetrics

    metrics = GatewayMetrics("m")
    metrics.set_workers(
        [
            WorkerInfo(worker_id="p0", role="prefill", model="m", pid=1, admitted=30),
            WorkerInfo(worker_id="p1", role="prefill", model="m", pid=2, admitted=12),
            # A decode worker admits handoffs too: only its local prefills count.
            WorkerInfo(
                worker_id="d0", role="decode", model="m", pid=3, admitted=50, local_prefills=8
            ),
            WorkerInfo(worker_id="c0", role="colocated", model="m", pid=4, admitted=5),
        ]
    )
    text = metrics.render().decode()
    assert prompts_prefilled(text) == {
        "prefill": 42,
        "decode": 8,
        "colocated": 5,
        "prefix_hit_tokens": 0,
        "prefix_queried_tokens": 0,
        "kv_bytes_sent": 0,
    }


def test_slo_sets_give_attainment_goodput_and_ratios_by_slo():
    sets = parse_slo_sets(["tpot15=ttft:2000,tpot:15", "tpot40=ttft:2000,tpot:40"])
    assert sets == {
        "tpot15": {"ttft": 2000.0, "tpot": 15.0},
        "tpot40": {"ttft": 2000.0, "tpot": 40.0},
    }
    for bad in (["ttft:2000"], ["a=ttft:1", "a=tpot:2"], ["x=itl:5"]):
        with pytest.raises(ValueError):
            parse_slo_sets(bad)
    fast = result(0.0, [(0.1, 1), (0.11, 1), (0.12, 1)], 0.12)  # tpot 10
    medium = result(0.0, [(0.1, 1), (0.13, 1), (0.16, 1)], 0.16)  # tpot 30
    failed = result(0.0, [(0.01, 1)], 0.02, expected=3)
    row = summarize_run([fast, fast, medium, failed], 1.0, {}, sets)
    # Failures count against attainment: 2 of 4 within 15 ms, 3 of 4 within 40 ms.
    assert row["slo_attainment"] == {"tpot15": 0.5, "tpot40": 0.75}

    def rate_row(req_s, tpot15, tpot40):
        return {"request_throughput": req_s, "slo_attainment": {"tpot15": tpot15, "tpot40": tpot40}}

    metrics = {
        "modes": {
            "1p1d": {"rates": {"4": rate_row(4.0, 0.95, 1.0), "8": rate_row(7.9, 0.91, 0.99)}},
            "1p1d-local": {"rates": {"4": rate_row(4.0, 0.8, 1.0), "8": rate_row(8.0, 0.5, 0.95)}},
            "colocated": {"rates": {"4": rate_row(4.0, 0.5, 1.0), "8": rate_row(7.8, 0.1, 0.92)}},
        }
    }
    args = argparse.Namespace(slo_set_limits=sets, slo_attainment=0.9, gpus=2)
    _add_attainment_ratios(metrics, ["1p1d", "1p1d-local", "colocated"], args)
    assert metrics["attainment_goodput"] == {
        "tpot15": {"1p1d": 7.9, "1p1d-local": 0.0, "colocated": 0.0},
        "tpot40": {"1p1d": 7.9, "1p1d-local": 8.0, "colocated": 7.8},
    }
    assert metrics["goodput_ratio_1p1d_vs_2_colocated_by_slo"] == {"tpot15": None, "tpot40": 1.013}
    assert metrics["goodput_ratio_1p1d_local_vs_2_colocated_by_slo"]["tpot40"] == 1.026
    assert metrics["goodput_ratio_best_disaggregated_vs_2_colocated_by_slo"]["tpot40"] == 1.026


def test_prefix_hit_rate_and_bytes_per_request_sum_over_the_pool():
    from tandem.bench.serve_stats import prefix_figures
    from tandem.core.protocol import WorkerInfo
    from tandem.gateway.metrics import GatewayMetrics

    def figures(hit: int, queried: int, sent: int) -> dict[str, int]:
        metrics = GatewayMetrics("m")
        workers = [
            WorkerInfo(
                worker_id=f"p{i}",
                role="prefill",
                model="m",
                pid=i,
                prefix_hit_tokens=hit,
                prefix_queried_tokens=queried,
                kv_bytes_sent=sent,
            )  # fmt: skip
            for i in range(2)
        ]
        metrics.set_workers(workers)
        return prompts_prefilled(metrics.render().decode())

    before, after = figures(100, 400, 1000), figures(400, 800, 5000)
    assert prefix_figures(before, after, completed=4) == {
        "prefix_hit_rate": 0.75,  # (800 - 200) / (1600 - 800)
        "kv_bytes_per_request": 2000,  # (10000 - 2000) / 4
    }
    assert prefix_figures(after, after, completed=0) == {
        "prefix_hit_rate": None,
        "kv_bytes_per_request": None,
    }


def _workload_args(**fields):
    import argparse

    base = dict(vocab_size=1000, input_len=10, output_len=4, range_ratio=0.0,
                shared_prefix_len=50, turns=3, turn_gap=1.0)  # fmt: skip
    return argparse.Namespace(**{**base, **fields})


def test_shared_prefix_workload_shares_exactly_the_system_prompt():
    from tandem.bench.serve_workloads import workload_prompts

    prompts, arrivals, ideal = workload_prompts(
        _workload_args(workload="shared-prefix"), 5, 2.0, "s"
    )
    assert len(prompts) == len(arrivals) == 5
    assert all(len(p.token_ids) == 60 and p.output_len == 4 for p in prompts)
    assert len({tuple(p.token_ids[:50]) for p in prompts}) == 1
    assert len({tuple(p.token_ids[50:]) for p in prompts}) == 5
    assert ideal == pytest.approx(50 * 4 / (60 * 5))


def test_multi_turn_workload_grows_each_conversation_by_a_turn():
    from tandem.bench.serve_workloads import workload_prompts

    args = _workload_args(workload="multi-turn")
    prompts, arrivals, ideal = workload_prompts(args, 6, 1.0, "s")  # two users, three turns
    assert arrivals == sorted(arrivals) and len(prompts) == 6
    by_len: dict[int, list] = {}
    for p in prompts:
        by_len.setdefault(len(p.token_ids), []).append(p.token_ids)
    assert sorted(by_len) == [10, 24, 38]  # + 4 answer stand-in + 10 new tokens a turn
    for short, longer in ((10, 24), (24, 38)):
        for convo in by_len[longer]:
            assert any(convo[:short] == p for p in by_len[short])  # its previous turn leads
    assert ideal == pytest.approx(2 * (10 + 24) / (2 * (10 + 24 + 38)))
    same, _, _ = workload_prompts(args, 6, 1.0, "s")
    assert [p.token_ids for p in same] == [p.token_ids for p in prompts]
