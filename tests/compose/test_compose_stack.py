"""The compose deployment for real (marker `compose`, run by scripts/compose-test.sh):
images built offline, `docker-compose up --scale prefill=2 --scale decode=2` on CPU with
SmolLM2, streams through the published ports token-exact with the in-process engine, a
decode container crashing mid-stream and coming back, Redis crashing and keeping its
data, and `docker-compose down -v` leaving nothing. The tests share one stack and run in
file order; each wait is bounded."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from tandem.core.sampling_params import SamplingParams
from tests.compose.stack import (
    STACK_KEY,
    WORKERS,
    Stack,
    build_images,
    docker,
    engine_unavailable_reason,
    start_stack,
    stop_stack,
)
from tests.faults.cluster import collect, request, stream_in_background

# Cold, the fixtures debootstrap a base, download a wheelhouse and build two images.
pytestmark = [pytest.mark.compose, pytest.mark.timeout(2400)]

PROMPTS = ["The history of the Roman Empire", "def add(a, b):", "Les fleurs du printemps",
           "List three fruits:"]  # fmt: skip


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    reason = engine_unavailable_reason()
    if reason is not None:
        pytest.skip(f"NO DOCKER ENGINE, THE COMPOSE STACK WAS NOT RUN: {reason}")
    return build_images()


@pytest.fixture(scope="module")
def stack(images: dict[str, str], tmp_path_factory, pytestconfig: pytest.Config):
    stack = start_stack(images, tmp_path_factory.mktemp("compose"))
    pytestconfig.stash[STACK_KEY] = stack
    try:
        stack.wait_for(stack.ready, "the gateway ready with 2 prefill and 2 decode workers", 600)
        yield stack
    finally:
        stop_stack(stack)


@pytest.fixture(scope="module")
def engine():
    from tandem.engine.llm import LLM

    return LLM("smollm2", device="cpu")


def test_only_the_gateway_publishes_ports(stack: Stack) -> None:
    for service in ("redis", *WORKERS):
        for container in stack.containers(service):
            assert docker("port", container).strip() == "", service
    (gateway,) = stack.containers("gateway")
    published = docker("port", gateway).split()
    assert f"127.0.0.1:{stack.http_port}" in published
    assert f"127.0.0.1:{stack.grpc_port}" in published
    assert "torch" not in docker("exec", gateway, "python", "-m", "pip", "list")


def test_concurrent_grpc_streams_equal_the_engine(stack: Stack, engine) -> None:
    jobs = [(f"{PROMPTS[i % len(PROMPTS)]} {i}", 8 + 4 * i) for i in range(6)]
    stub = stack.stub()
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda job: collect(stub, request(*job)), jobs))
    want = engine.generate([p for p, _ in jobs], [greedy(n) for _, n in jobs])
    assert got == [w.token_ids for w in want]


def test_openai_http_equals_the_engine(stack: Stack, engine) -> None:
    want = engine.generate(PROMPTS, greedy(12))
    body = {"model": "smollm2", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    for prompt, solo in zip(PROMPTS, want, strict=True):
        res = json.loads(stack.post("/v1/completions", {**body, "prompt": prompt}))
        assert res["choices"][0]["text"] == solo.text
        assert res["choices"][0]["finish_reason"] == "length"
        assert res["usage"]["completion_tokens"] == 12
    sse = stack.post("/v1/completions", {**body, "prompt": PROMPTS[0], "stream": True})
    events = [line.removeprefix("data: ") for line in sse.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == want[0].text


def _container_of(stack: Stack, worker_id: str) -> str:
    """Worker ids are ROLE-HOSTNAME-PID-SUFFIX, and a container's hostname is its short id."""
    (found,) = [c for c in stack.containers("decode") if c[:12] in worker_id]
    return found


def _idle(decoders: dict) -> bool:
    return all(f["running"] == f["waiting"] == f["kv_blocks_used"] == 0 for f in decoders.values())


def test_a_crashed_decode_container_fails_only_its_streams_and_comes_back(
    stack: Stack, engine
) -> None:
    # Which decoder runs a stream is read from the registry, refreshed once a second: only
    # heartbeats sent after the moment that matters count, or the figures of the earlier
    # tests' requests could name the wrong decoder as the doomed stream's owner.
    stack.wait_for_decoders(time.time(), _idle, "both decoders idle")
    # Long enough to be still streaming at the crash, however fast the machine is.
    doomed, started = stream_in_background(stack, request("The history of Rome", 2000), 3)
    assert started.wait(120)
    decoders = stack.wait_for_decoders(
        time.time(),
        lambda d: sorted(f["running"] for f in d.values()) == [0, 1],
        "the doomed stream on one decoder",
    )
    (owner,) = [w for w, f in decoders.items() if f["running"]]
    (other,) = [w for w in decoders if w != owner]
    assert decoders[owner]["kv_blocks_used"] > 0
    # Decoders are picked by free blocks: the owner has fewer, so the next one goes to
    # the other decoder. It too must still be streaming at the crash, to show that the
    # crash spares it.
    spared_prompt, spared_len = "A short poem", 500
    spared, spared_started = stream_in_background(stack, request(spared_prompt, spared_len), 1)
    assert spared_started.wait(120)

    def both_running(decoders: dict) -> bool:
        assert spared["thread"].is_alive(), "the spared stream ended before it was seen running"
        return sum(f["running"] for f in decoders.values()) == 2

    decoders = stack.wait_for_decoders(
        time.time(), both_running, "the doomed and the spared stream running"
    )
    assert decoders[owner]["running"] == decoders[other]["running"] == 1, decoders

    victim = _container_of(stack, owner)
    restarts = stack.state(victim)["RestartCount"]
    assert doomed["thread"].is_alive(), "the doomed stream ended before the crash"
    assert spared["thread"].is_alive(), "the spared stream ended before the crash"
    stack.crash(victim)
    doomed["thread"].join(60)
    assert not doomed["thread"].is_alive()
    assert doomed["error"].code() == grpc.StatusCode.UNAVAILABLE
    assert owner in doomed["error"].details()
    spared["thread"].join(120)
    assert "error" not in spared
    assert spared["tokens"] == engine.generate([spared_prompt], greedy(spared_len))[0].token_ids

    # restart: unless-stopped brings the same container back, and it serves again.
    stack.wait_for(lambda: stack.state(victim)["RestartCount"] > restarts
                   and stack.state(victim)["Running"], "the decode container restarted", 120)  # fmt: skip
    stack.wait_for(stack.ready, "the restarted decoder registered", 300)
    # Decoders are picked by free blocks: while a long stream holds blocks on one, the next
    # request goes to the other. Either way the restarted decoder takes one of the two.
    held, held_started = stream_in_background(stack, request("Tell me about the sea", 200), 1)
    assert held_started.wait(120)
    stack.wait_for_decoders(time.time(), lambda d: sum(f["running"] for f in d.values()) == 1,
                            "a decoder holding the long stream")  # fmt: skip
    prompt = "A second poem"
    assert (
        collect(stack.stub(), request(prompt, 8))
        == engine.generate([prompt], greedy(8))[0].token_ids
    )
    held["thread"].join(300)
    assert "error" not in held and len(held["tokens"]) == 200
    # The restarted process registers under a new id (same container, new suffix).
    stack.wait_for(lambda: any(victim[:12] in w and w != owner and f.get("admitted", 0) > 0
                               for w, f in stack.workers().items()),
                   "the restarted decoder admitting work", 30)  # fmt: skip


def test_redis_crash_keeps_its_data_and_the_stack_serves_on(stack: Stack, engine) -> None:
    (redis,) = stack.containers("redis")
    docker("exec", redis, "redis-cli", "SET", "compose-test:persisted", "yes")
    time.sleep(2)  # appendfsync everysec
    restarts = stack.state(redis)["RestartCount"]
    stack.crash(redis)
    stack.wait_for(lambda: stack.state(redis)["RestartCount"] > restarts
                   and stack.state(redis)["Running"], "redis restarted", 120)  # fmt: skip
    stack.wait_for(lambda: docker("exec", redis, "redis-cli", "PING", check=False).strip() == "PONG",
                   "redis answering", 60)  # fmt: skip
    assert docker("exec", redis, "redis-cli", "GET", "compose-test:persisted").strip() == "yes"
    stack.wait_for(stack.steady, "every worker back in the registry", 120)
    prompt = PROMPTS[2]
    assert (
        collect(stack.stub(), request(prompt, 8))
        == engine.generate([prompt], greedy(8))[0].token_ids
    )


def test_a_crashed_gateway_comes_back(stack: Stack, engine) -> None:
    (gateway,) = stack.containers("gateway")
    restarts = stack.state(gateway)["RestartCount"]
    stack.crash(gateway)
    stack.wait_for(
        lambda: stack.state(gateway)["RestartCount"] > restarts, "gateway restarted", 120
    )
    stack.wait_for(stack.ready, "the gateway ready again", 300)
    prompt = PROMPTS[3]
    assert (
        collect(stack.stub(), request(prompt, 8))
        == engine.generate([prompt], greedy(8))[0].token_ids
    )


def test_down_leaves_no_container_volume_or_network(stack: Stack) -> None:
    assert stack.leftovers()  # the stack is up: its containers, volumes and networks exist
    stop_stack(stack)
    assert stack.leftovers() == []
