"""A worker's gateway-liveness check, with a fake clock and a fake Redis: a gateway's
requests are aborted once its key, seen before or known from the gateway's long-lived
`:known` key, stayed missing for the grace; never for a stream that never had a gateway,
nor for a key back within the grace (a Redis restarted without data)."""

from __future__ import annotations

import redis

from tandem.core.owner_liveness import OwnerLiveness
from tandem.core.redis_keys import gateway_alive_key, gateway_known_key

GW_A, GW_B = "tandem:reply:gwa", "tandem:reply:gwb"


class FakeRedis:
    def __init__(self) -> None:
        self.keys: set[str] = set()
        self.down = False

    def pipeline(self, transaction: bool = False) -> FakeRedis:
        self._queued: list[str] = []
        return self

    def exists(self, key: str) -> None:
        self._queued.append(key)

    def execute(self) -> list[int]:
        if self.down:
            raise redis.ConnectionError("down")
        return [int(k in self.keys) for k in self._queued]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _liveness(held: dict[str, str]) -> tuple[OwnerLiveness, FakeRedis, Clock, list[str]]:
    client, clock, aborted = FakeRedis(), Clock(), []
    check = OwnerLiveness(client, lambda: dict(held), aborted.append, grace_s=2.0, clock=clock)  # type: ignore[arg-type]
    return check, client, clock, aborted


def test_a_dead_gateways_requests_are_aborted_after_the_grace() -> None:
    held = {"r1": GW_A, "r2": GW_A, "r3": GW_B}
    check, client, clock, aborted = _liveness(held)
    client.keys = {gateway_alive_key(GW_A), gateway_alive_key(GW_B)}
    assert check.check() == []
    client.keys.discard(gateway_alive_key(GW_A))  # gateway A dies
    clock.now += 1.0
    assert check.check() == []  # missing, within the grace
    clock.now += 1.9
    assert check.check() == []  # 1.9 s after it was first missed
    clock.now += 0.2
    assert sorted(check.check()) == ["r1", "r2"]
    assert sorted(aborted) == ["r1", "r2"]  # gateway B's request runs on


def test_a_key_back_within_the_grace_aborts_nothing() -> None:
    held = {"r1": GW_A}
    check, client, clock, aborted = _liveness(held)
    client.keys = {gateway_alive_key(GW_A)}
    check.check()
    client.keys.clear()  # Redis restarted without data
    clock.now += 1.0
    check.check()
    client.keys = {gateway_alive_key(GW_A)}  # the gateway's next beat
    clock.now += 1.0
    check.check()
    client.keys.clear()  # a later gap starts its own grace
    clock.now += 1.5
    assert check.check() == []
    clock.now += 1.5
    assert check.check() == []
    assert aborted == []


def test_a_key_never_seen_is_never_judged() -> None:
    check, client, clock, aborted = _liveness({"r1": GW_A})
    for _ in range(5):
        clock.now += 5.0
        assert check.check() == []
    assert aborted == []


def test_redis_down_judges_nothing_and_run_survives_it() -> None:
    check, client, clock, aborted = _liveness({"r1": GW_A})
    client.keys = {gateway_alive_key(GW_A)}
    check.check()
    client.down = True
    rounds = iter(range(3))
    check.run(lambda _s: next(rounds, None) is None, check_s=0)  # three rounds, all failing
    assert aborted == []
    client.down = False
    client.keys.clear()
    clock.now += 1.0
    assert check.check() == []  # the grace counts from the first miss actually seen
    clock.now += 2.0
    assert check.check() == ["r1"]


def test_new_requests_of_a_gateway_judged_dead_are_aborted_too() -> None:
    held = {"r1": GW_A}
    check, client, clock, _ = _liveness(held)
    client.keys = {gateway_alive_key(GW_A)}
    check.check()
    client.keys.clear()
    check.check()
    clock.now += 2.0
    assert check.check() == ["r1"]
    held.clear()
    held["r2"] = GW_A  # read from the stream after its gateway died, while r1 was held
    clock.now += 1.0
    assert check.check() == ["r2"]


def test_a_known_gateways_requests_are_aborted_though_its_key_was_never_seen() -> None:
    # A task of gateway A queued while it lived, taken only after it died: this worker
    # never saw A's heartbeat key, but A's known key says the stream had a gateway.
    held = {"r1": GW_A, "r2": GW_B}
    check, client, clock, aborted = _liveness(held)
    client.keys = {gateway_known_key(GW_A)}  # B: written by hand, no gateway ever
    assert check.check() == []  # the first miss starts the grace
    clock.now += 1.9
    assert check.check() == []
    clock.now += 0.2
    assert check.check() == ["r1"]
    del held["r1"]  # the model loop dropped it
    for _ in range(3):
        clock.now += 5.0
        assert check.check() == []
    assert aborted == ["r1"]  # the gateway-less stream's request runs on


def test_a_known_gateway_back_within_the_grace_aborts_nothing() -> None:
    check, client, clock, aborted = _liveness({"r1": GW_A})
    client.keys = {gateway_known_key(GW_A)}
    check.check()
    clock.now += 1.5
    client.keys.add(gateway_alive_key(GW_A))  # a late beat: the gateway lives
    check.check()
    clock.now += 5.0
    assert check.check() == []
    assert aborted == []
