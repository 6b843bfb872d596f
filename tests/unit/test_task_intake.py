"""The prefill stream's intake rules, shared by prefill, colocated and (locally
prefilling) decode workers, against a real redis-server (no model, no torch)."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from tandem.core.config import WorkerConfig
from tandem.core.protocol import PrefillTask, TokenBatch, decode, encode
from tandem.core.redis_client import add_task
from tandem.core.redis_keys import MESSAGE_FIELD, PREFILL_GROUP, abort_marker, dead_letter_stream
from tandem.core.sampling_params import SamplingParams
from tandem.core.task_intake import TaskIntake, tasks_fitting
from tandem.local_redis import LocalRedis

REPLY = "tandem:reply:unit"
_models = itertools.count()


@pytest.fixture(scope="module")
def client() -> Iterator[redis.Redis]:
    with LocalRedis() as server:
        c = redis.Redis.from_url(server.url, socket_timeout=5)
        yield c
        c.close()


def _intake(client: redis.Redis, consumer: str, model: str, **config) -> TaskIntake:
    cfg = WorkerConfig(redis_url="redis://unused", role="colocated", **config)
    intake = TaskIntake(client, model, consumer, cfg)
    intake.ensure_group()
    return intake


@pytest.fixture
def model() -> str:
    return f"m{next(_models)}"  # a fresh stream per test


def _task(rid: str, deadline_in: float = 60.0) -> PrefillTask:
    return PrefillTask(
        request_id=rid,
        prompt_token_ids=[1, 2, 3],
        sampling=SamplingParams(),
        reply_stream=REPLY,
        deadline=time.time() + deadline_in,
    )


def _replies(client: redis.Redis) -> list:
    return [d for _, f in client.xrange(REPLY) for d in decode(f[MESSAGE_FIELD], TokenBatch).deltas]


def test_takes_at_most_count_and_leaves_the_rest_for_peers(client, model):
    intake = _intake(client, "w1", model)
    for i in range(5):
        add_task(client, intake.stream, _task(f"r{i}"))
    got = intake.poll(2, None, {})
    assert [t.request_id for _, t in got] == ["r0", "r1"]
    assert intake.poll(0, None, {}) == []  # no room: nothing read
    peer = _intake(client, "w2", model)
    assert [t.request_id for _, t in peer.poll(16, None, {})] == ["r2", "r3", "r4"]


def test_bad_duplicate_aborted_and_expired_tasks_are_settled_not_run(client, model):
    client.delete(REPLY)
    intake = _intake(client, "w1", model)
    held_entry = add_task(client, intake.stream, _task("held"))
    client.xadd(intake.stream, {MESSAGE_FIELD: b"\x00not msgpack"})
    duplicate = add_task(client, intake.stream, _task("held"))
    add_task(client, intake.stream, _task("twice"))
    add_task(client, intake.stream, _task("twice"))
    client.set(abort_marker("gone"), b"1", ex=60)
    add_task(client, intake.stream, _task("gone"))
    add_task(client, intake.stream, _task("late", deadline_in=-1))
    add_task(client, intake.stream, _task("ok"))
    client.xreadgroup(PREFILL_GROUP, "w1", {intake.stream: ">"}, count=1)  # "held" is ours
    got = intake.poll(16, None, {"held": held_entry})
    assert [t.request_id for _, t in got] == ["twice", "ok"]
    # Everything settled is acknowledged and deleted; what runs stays pending.
    left = {e for e, _ in client.xrange(intake.stream)}
    assert duplicate not in left
    assert left == {held_entry, *(e for e, _ in got)}
    assert client.xpending(intake.stream, PREFILL_GROUP)["pending"] == 3
    [error] = _replies(client)
    assert (error.request_id, error.error_code) == ("late", "deadline")


def test_dead_workers_tasks_are_reclaimed_and_held_ones_kept_alive(client, model):
    intake = _intake(client, "w1", model, reclaim_idle_s=0.3)
    mine = add_task(client, intake.stream, _task("mine"))
    assert [e for e, _ in intake.poll(1, None, {})] == [mine]
    add_task(client, intake.stream, _task("orphan"))
    client.xreadgroup(PREFILL_GROUP, "dead", {intake.stream: ">"}, count=1)
    peer = _intake(client, "w2", model, reclaim_idle_s=0.3)
    deadline = time.monotonic() + 5
    reclaimed: list = []
    while not reclaimed and time.monotonic() < deadline:
        intake.poll(0, None, {"mine": mine})  # w1 is busy, but keeps its task alive
        reclaimed = peer.poll(4, None, {})
        time.sleep(0.05)
    assert [t.request_id for _, t in reclaimed] == ["orphan"]
    owners = {
        row["message_id"]: row["consumer"]
        for row in client.xpending_range(intake.stream, PREFILL_GROUP, "-", "+", 10)
    }
    assert owners[mine] == b"w1"


def test_a_task_delivered_too_often_is_dead_lettered_with_an_error(client, model):
    client.delete(REPLY)
    intake = _intake(client, "w1", model, reclaim_idle_s=0.2, max_deliveries=2)
    entry = add_task(client, intake.stream, _task("poison"))
    client.xreadgroup(PREFILL_GROUP, "ghost-1", {intake.stream: ">"}, count=1)
    client.xautoclaim(intake.stream, PREFILL_GROUP, "ghost-2", min_idle_time=0, start_id="0-0")
    time.sleep(0.25)
    assert intake.poll(4, None, {}) == []
    [(_, dead)] = client.xrange(dead_letter_stream(model))
    assert decode(dead[MESSAGE_FIELD], PrefillTask).request_id == "poison"
    assert dead[b"entry"] == entry
    assert client.xlen(intake.stream) == 0
    [error] = _replies(client)
    assert (error.request_id, error.error_code) == ("poison", "internal")


def test_a_lost_group_is_recreated(client, model):
    intake = _intake(client, "w1", model)
    client.delete(intake.stream)  # what a Redis restarted without its data looks like
    assert intake.poll(4, None, {}) == []
    assert [g["name"] for g in client.xinfo_groups(intake.stream)] == [PREFILL_GROUP.encode()]
    add_task(client, intake.stream, _task("after"))
    assert [t.request_id for _, t in intake.poll(4, None, {})] == ["after"]


def test_backlog_is_the_oldest_task_no_worker_was_given_aged_by_redis_clock(client, model):
    intake = _intake(client, "w1", model)
    assert intake.backlog() is None  # an empty stream: the prefill pool keeps up
    seconds, micros = client.time()
    now_ms = seconds * 1000 + micros // 1000
    # Explicit ids: entries queued 5 s and 1 s ago, and one just now.
    old = client.xadd(intake.stream, {MESSAGE_FIELD: encode(_task("old"))}, id=f"{now_ms - 5000}-0")
    mid = client.xadd(intake.stream, {MESSAGE_FIELD: encode(_task("mid"))}, id=f"{now_ms - 1000}-0")
    add_task(client, intake.stream, _task("new"))
    backlog = intake.backlog()
    assert (backlog.entry_id, backlog.task.request_id) == (old, "old")
    assert backlog.age_ms >= 5000
    # A worker took the oldest: the next one is what waits now, whatever happens to the first.
    client.xreadgroup(PREFILL_GROUP, "prefill-0", {intake.stream: ">"}, count=1)
    backlog = intake.backlog()
    assert (backlog.entry_id, backlog.task.request_id) == (mid, "mid")
    assert 1000 <= backlog.age_ms < 5000
    intake.ack(old)  # acknowledged and deleted: the group's last-delivered id stays
    assert intake.backlog().entry_id == mid
    assert [t.request_id for _, t in intake.poll(1, None, {})] == ["mid"]
    assert intake.backlog().task.request_id == "new"
    intake.poll(1, None, {})
    assert intake.backlog() is None
    client.delete(intake.stream)  # a Redis restarted without its data
    assert intake.backlog() is None
    assert [g["name"] for g in client.xinfo_groups(intake.stream)] == [PREFILL_GROUP.encode()]


def test_a_prefill_worker_takes_about_one_steps_worth_of_tasks():
    # Unknown or long prompts: one at a time (the rest stay for idle peers).
    assert tasks_fitting(2048, 2048.0, 16) == 1
    assert tasks_fitting(2048, 8000.0, 16) == 1
    assert tasks_fitting(100, 2048.0, 16) == 1  # a partly free step still takes one
    # Short prompts: as many as the free budget holds, up to the read limit.
    assert tasks_fitting(2048, 512.0, 16) == 4
    assert tasks_fitting(1500, 500.0, 16) == 3
    assert tasks_fitting(2048, 10.0, 16) == 16


def test_only_reads_that_entry_and_only_while_it_is_the_next_one_handed_out(client, model):
    judge = _intake(client, "decode", model)
    first = add_task(client, judge.stream, _task("first"))
    second = add_task(client, judge.stream, _task("second"))
    assert judge.backlog().entry_id == first
    # Not the next one: nothing is delivered, whatever `count` allows.
    assert judge.poll(1, None, {}, only=second) == []
    assert client.xpending(judge.stream, PREFILL_GROUP)["pending"] == 0
    # A peer read `first` after the look: the judge gets nothing rather than `second`,
    # a task it never judged.
    peer = _intake(client, "prefill", model)
    assert [t.request_id for _, t in peer.poll(1, None, {})] == ["first"]
    assert judge.poll(1, None, {}, only=first) == []
    assert judge.backlog().entry_id == second
    got = judge.poll(1, None, {}, only=second)
    assert [(e, t.request_id) for e, t in got] == [(second, "second")]
    pending = client.xpending_range(judge.stream, PREFILL_GROUP, "-", "+", 10)
    assert {(p["message_id"], p["consumer"]) for p in pending} == {
        (first, b"prefill"),
        (second, b"decode"),
    }
    assert judge.poll(1, None, {}, only=second) == []  # delivered once only
    assert judge.poll(0, None, {}, only=b"1-0") == []  # no room: nothing read


def test_waiting_for_a_task_wakes_with_its_arrival_and_takes_nothing(client, model):
    intake = _intake(client, "w1", model)
    assert not intake.wait_for_task(10)  # no look at the stream yet: nothing to wait from
    assert intake.backlog() is None
    assert not intake.wait_for_task(10)  # nothing arrives: False when the wait is over
    # A task added after the look, before the wait: it returns at once.
    add_task(client, intake.stream, _task("early"))
    assert intake.wait_for_task(4000)
    assert [t.request_id for _, t in intake.poll(1, None, {})] == ["early"]
    assert intake.backlog() is None
    # One added while it waits wakes it (a 4 s wait that timed out would say False).
    woke: list[bool] = []
    waiter = threading.Thread(target=lambda: woke.append(intake.wait_for_task(4000)))
    waiter.start()
    add_task(client, intake.stream, _task("later"))
    waiter.join(30)
    assert woke == [True]
    # Nothing taken: the task is still the group's next, for whoever judges it.
    assert intake.backlog().task.request_id == "later"
    assert [t.request_id for _, t in intake.poll(1, None, {})] == ["later"]
