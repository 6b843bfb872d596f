"""`tandem bench latency|throughput|transfer|serve|gateway|grpc-floor`: argument parsing and dispatch."""

from __future__ import annotations

import argparse
from pathlib import Path

from tandem.bench.serve_service import MODES
from tandem.bench.serve_workloads import add_workload_args
from tandem.engine.engine_args import add_engine_args, engine_config_from_args

# Where results go (bench.results writes there too); defined here to keep torch unloaded.
RESULTS_DIR = Path(__file__).parent / "results"


def add_bench_parser(sub) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    bench = sub.add_parser(
        "bench", help="benchmarks; results go to bench/results/", formatter_class=fmt
    )
    kinds = bench.add_subparsers(dest="benchmark", required=True)
    helps = {
        "latency": "one batch timed step by step, beside the hardware ceiling",
        "throughput": "offline: every request at t=0, optionally beside transformers",
        "prefix_step": "a cached-prefix request's first token in the engine alone, step by step",
    }
    engine_benches = (
        ("latency", _latency_args),
        ("throughput", _throughput_args),
        ("prefix_step", _prefix_step_args),
    )
    for name, add_arguments in engine_benches:
        p = kinds.add_parser(name.replace("_", "-"), help=helps[name], formatter_class=fmt)
        add_engine_args(p)
        add_arguments(p)
        p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)

        def handler(args, name=name) -> int:
            # Imported here: building the CLI must not load torch (the gateway uses it).
            import importlib

            from tandem.engine.engine import Engine

            module = importlib.import_module(f"tandem.bench.{name}")
            module.run(args, Engine(engine_config_from_args(args)))
            return 0

        p.set_defaults(func=handler)

    # Benchmarks with their own processes and no engine flags: (module, help, arguments).
    standalone = {
        "transfer": (
            "transfer",
            "KV transfer GB/s per backend (Llama-3.1-8B-shaped KV) beside its ceiling",
            _transfer_args,
        ),
        "gateway": (
            "gateway_bench",
            "one gateway's capacity against a fake worker pool: streamed tokens/s, "
            "added latency, CPU per 1,000 tokens, over gRPC and HTTP, at 1 and N processes",
            _gateway_args,
        ),
        "grpc-floor": (
            "grpc_floor",
            "a bare grpc.aio server's CPU per streamed message (the floor under the "
            "gateway's gRPC path), with the gateway bench's clients",
            _grpc_floor_args,
        ),
    }
    for name, (module, help_text, add_arguments) in standalone.items():
        p = kinds.add_parser(name, formatter_class=fmt, help=help_text)
        add_arguments(p)
        p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)

        def standalone_handler(args, module=module) -> int:
            import importlib

            importlib.import_module(f"tandem.bench.{module}").run(args)
            return 0

        p.set_defaults(func=standalone_handler)

    p = kinds.add_parser(
        "serve",
        help="the service under load: Poisson arrivals, TTFT, TPOT, "
        "ITL, goodput; launches `tandem serve` per mode or uses --target",
        formatter_class=fmt,
    )
    add_engine_args(p)
    _serve_args(p)
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)

    def serve_handler(args) -> int:
        from tandem.bench.serve import run  # grpc and the gateway's client: only when serving

        run(args)
        return 0

    p.set_defaults(func=serve_handler)


def _transfer_args(p: argparse.ArgumentParser) -> None:
    # Without torch loaded: CUDA's presence decides the defaults only once it runs.
    p.add_argument(
        "--backends",
        default=None,
        help="comma-separated: zmq, cuda_ipc, nccl (default: zmq,cuda_ipc with a GPU, zmq without)",
    )
    p.add_argument("--tokens", default="512,2048,8192", help="tokens per request")
    p.add_argument("--requests", default="1,16,256", help="concurrent requests")
    p.add_argument(
        "--sender-device",
        default=None,
        help="the sender's cache (default: cuda:0 with a GPU, else cpu)",
    )
    p.add_argument(
        "--receiver-device",
        default=None,
        help="the receiver process's cache (default: the sender's device)",
    )
    p.add_argument(
        "--calls",
        choices=("one", "threads"),
        default="one",
        help="N requests in one ship_many call (as a prefill worker ships a step's "
        "requests), or from N threads each calling ship",
    )
    p.add_argument("--iters", type=int, default=3, help="timed rounds per case (median)")
    p.add_argument(
        "--max-gib",
        type=float,
        default=16.0,
        help="skip cases moving more than this per side (cache and staging)",
    )
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per transfer")


def _prefix_step_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shared-prefix-len", type=int, default=2000)
    p.add_argument("--input-len", type=int, default=100, help="each request's own tokens")
    p.add_argument("--decode-batch", type=int, default=8, help="requests decoding beside it")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="a torch profile of one request")


def _latency_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--e2e-batch-size", type=int, default=8)
    p.add_argument("--e2e-input-len", type=int, default=32)
    p.add_argument("--e2e-output-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=1)


def _throughput_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument(
        "--uniform",
        action="store_true",
        help="input and output lengths uniform in [--min-len, --max-len] (seed 0)",
    )
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--peer", choices=["none", "hf"], default="none")
    p.add_argument(
        "--peer-batch-sizes",
        default="64,128,256",
        help="transformers batch sizes to try; the best one is reported",
    )
    p.add_argument(
        "--peer-requests",
        type=int,
        default=256,
        help="requests of the workload run through transformers",
    )


def _gateway_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--apis", default="grpc,http", help="comma-separated: grpc, http")
    p.add_argument(
        "--gateway-workers", default="1,2", help="comma-separated gateway process counts"
    )
    p.add_argument("--streams", type=int, default=2000, help="concurrent streams, all at once")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per stream")
    p.add_argument(
        "--token-delay",
        type=float,
        default=0.0,
        help="seconds from one fake-pool step's start to the next's, on a clock "
        "(0: as fast as it can); each pool process offers its streams a token per step",
    )
    p.add_argument(
        "--pool-processes",
        type=int,
        default=2,
        help="fake pool processes sharing the task stream, so the pool does not set the pace",
    )
    p.add_argument(
        "--client-processes", type=int, default=4, help="processes the streams are split over"
    )
    p.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="directory with the tokenizer.json and config.json the gateway loads; "
        "default: smollm2's in the tandem model cache",
    )


def _grpc_floor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--handlers", default="write,yield", help="comma-separated: write, yield")
    p.add_argument("--streams", type=int, default=2000, help="concurrent streams, all at once")
    p.add_argument("--max-tokens", type=int, default=128, help="one-token messages per stream")
    p.add_argument(
        "--token-delay",
        type=float,
        default=0.0,
        help="seconds between a stream's messages, on one clock (0: as fast as it can)",
    )
    p.add_argument(
        "--client-processes", type=int, default=4, help="processes the streams are split over"
    )


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target",
        default=None,
        metavar="HOST:PORT",
        help="a running gateway (its gRPC port, or HTTP port with --backend http); "
        "default: launch `tandem serve` for each of --modes",
    )
    p.add_argument(
        "--backend",
        choices=["grpc", "http"],
        default="grpc",
        help="grpc: the Generate stream; http: /v1/completions with SSE",
    )
    p.add_argument(
        "--modes", "--mode", default="1p1d", help=f"comma-separated, of {', '.join(MODES)}"
    )
    p.add_argument("--gpus", type=int, default=1, help="GPUs 0..N-1 the service may use")
    p.add_argument(
        "--kv-transport",
        default=None,
        choices=["zmq", "cuda_ipc", "nccl"],
        help="passed to `tandem serve` (default: its own)",
    )
    p.add_argument(
        "--serve-args",
        default="",
        help='more `tandem serve` flags, e.g. "--decode-workers 2"; engine flags '
        "given to this command go to the service and the baseline alike",
    )
    p.add_argument(
        "--local-prefill-after-ms",
        type=float,
        default=200.0,
        metavar="MS",
        help="mode 1p1d-local: its decode worker prefills a task once the oldest "
        "task not taken by the prefill worker has waited MS ms",
    )
    p.add_argument(
        "--max-local-prefills",
        type=int,
        default=1,
        metavar="N",
        help="mode 1p1d-local: at most N of the decode worker's own tasks prefilling at once",
    )
    p.add_argument(
        "--local-prefill-tokens",
        type=int,
        default=0,
        metavar="N",
        help="mode 1p1d-local: the decode worker's prompt tokens per step (its "
        "--max-prefill-tokens; 0: the engine flag's value)",
    )
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=900.0,
        help="seconds for the service to start (dummy 8B + CUDA graphs: minutes)",
    )
    p.add_argument("--rates", default="inf", help="requests/s, comma-separated; inf: all at t=0")
    p.add_argument(
        "--num-prompts",
        type=int,
        default=200,
        help="prompts per rate (with --duration: the most per rate)",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=0.0,
        help="seconds of arrivals per finite rate: N = rate x S, clamped to "
        "[--min-prompts, --num-prompts]; 0: --num-prompts at every rate",
    )
    p.add_argument("--min-prompts", type=int, default=20)
    p.add_argument(
        "--input-len",
        type=int,
        default=1024,
        help="prompt tokens (shared-prefix: after the shared part; multi-turn: new per turn)",
    )
    p.add_argument("--output-len", type=int, default=128)
    add_workload_args(p)
    p.add_argument(
        "--range-ratio",
        type=float,
        default=0.0,
        help="lengths uniform in [len x (1 - r), len x (1 + r)]",
    )
    p.add_argument("--prompt-seed", type=int, default=0, help="seed of prompts and arrivals")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=0,
        help="token ids are drawn below it (0: from the model's files)",
    )
    p.add_argument(
        "--max-concurrency",
        type=int,
        default=0,
        help="requests in flight at most (0: no cap), split over client processes",
    )
    p.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="processes sending the load; one Python process streams some 10-20k "
        "chunks/s at most (see client_cpu_share in the results)",
    )
    p.add_argument(
        "--goodput",
        nargs="*",
        default=[],
        metavar="KEY:MS",
        help="SLOs for goodput, e.g. ttft:500 tpot:50 (keys ttft, tpot, e2e)",
    )
    p.add_argument(
        "--slo-sets",
        nargs="*",
        default=[],
        metavar="NAME=KEY:MS,...",
        help="named SLOs read off the same sweep, e.g. tpot20=ttft:2000,tpot:20; each "
        "gives DistServe's goodput: the highest rate with --slo-attainment of requests "
        "within every limit",
    )
    p.add_argument(
        "--slo-attainment",
        type=float,
        default=0.9,
        help="share of requests that must meet an SLO set (0.9: p90 attainment)",
    )
    p.add_argument(
        "--warmup-prompts",
        type=int,
        default=8,
        help="requests sent before measuring each mode (not counted)",
    )
    p.add_argument(
        "--request-timeout", type=float, default=900.0, help="client-side seconds per request"
    )
    p.add_argument(
        "--offline-baseline",
        action="store_true",
        help="run the in-process engine on the rate-inf prompts first (GPU 0)",
    )
    p.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        help="where service logs go (default: a new temporary directory)",
    )
    p.add_argument(
        "--trace-hops",
        action="store_true",
        help="time each request's hops to its first token (core/hop_trace.py) and report "
        "their medians per rate (hops_ms); the trace is hops-<mode>.log in --log-dir",
    )
