"""KV-aware routing: a task goes to the worker that already holds its prefix.

Tasks stay in the one prefill stream, read through the one consumer group, so reclaim,
dead letters and aborts work as before (core/task_intake.py). What changes is *who
reads the next task*:

- every prefill and colocated worker mirrors the hashes of its cached blocks
  (prefix_hash.py) into a Redis set, and how many tasks it holds into a counter, both
  expiring with its registry entry (`HashPublisher`): changes go out after the step
  that made them, the TTL is renewed by the heartbeat, so an evicted block leaves the
  set at once and a dead worker's keys are gone one registry TTL after its last
  heartbeat (the registry entry's own figures are up to a heartbeat old: too late to
  route by). A prefill worker's load is the tasks it has not handed off yet; a
  colocated worker's, its requests running or waiting (it keeps them to the end);
- a decode worker that prefills short remainders itself (`local_prefill_uncached_tokens`,
  core/local_prefill.py) publishes the same way: its set, and as its load how many
  more local prefills it would refuse (max_local_prefills minus its room);
- before it reads, a worker looks at the oldest task nobody has been given yet (the
  stream's backlog) and leaves it for a live peer that will do better with it
  (`PrefixRouter.defers`): a decode worker whose cache leaves at most its
  `local_prefill_uncached_tokens` of the task to compute and that has room for one
  more local prefill (no prefill, no transfer at all), else a peer *of its own role*
  that holds a longer cached prefix of it and is not busier than itself, or as long a
  prefix and `BALANCE_MARGIN` fewer tasks (the load balance; the margin keeps two
  workers whose published loads lag from each leaving the task to the other). The
  peer reads it on its next look. A task is left alone at most `wait_ms` (by Redis'
  clock): past that, whoever reads first takes it, so a busy or dead peer delays a
  task, never strands it;
- a routing worker reads one task at a time, each judged as the backlog's oldest: a
  batch read would hand the tasks behind the first out unjudged, and one worker
  could take a whole burst.

Peers by role: a prefill worker leaves tasks to prefill workers, a colocated worker to
colocated workers (and either to a decode worker that prefills the rest itself). In a
mixed deployment the two kinds never wait for each other: their loads mean different
things (a prefill worker's tasks leave it at the handoff, a colocated worker's stay to
the last token), and a task taken by the other kind is served all the same. Every
reader of the stream counts for `WorkerRouting.active`, though: while any other worker
reads, a routing worker never blocks in its read (a blocked reader takes each new task
unjudged the moment it arrives, so the peers' judgement would be moot). Idle, it waits
for the next task in a plain XREAD instead, which takes nothing and wakes with the task
(`WorkerRouting.pause`). All peers wake together and judge at once, so a worker
publishes its blocks and load before the tokens of the step that changed them (a
prefill worker before a first token, a colocated worker before a last one): once a
client has its answer, its next request is judged against them.

A worker-side decision rather than per-worker streams fed by a router: no task ever
sits in a stream only one worker reads, so a worker's death needs no new recovery path.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import redis

from tandem.core.kv_cache_manager import KVCacheManager
from tandem.core.local_prefill import Backlog
from tandem.core.redis_keys import cached_blocks_key, routing_load_key
from tandem.core.registry import list_workers
from tandem.core.task_intake import TaskIntake

log = logging.getLogger(__name__)

PUBLISHED_HASH_BYTES = 8  # a prefix of the 16-byte hash: compact, collisions only misroute
BALANCE_MARGIN = 2  # tasks fewer a peer with as long a prefix must hold to be left one
# While no peer is seen, look again this often: a worker that started before its peers
# registered must not read alone (blocking, whole bursts) for a heartbeat.
NO_PEERS_TTL_S = 0.1


class HashPublisher:
    """Mirrors a block pool's cache (what it can serve by hash) into a Redis set, and
    the worker's load into a counter beside it."""

    def __init__(
        self, client: redis.Redis, model: str, worker_id: str, kv: KVCacheManager, ttl_s: float
    ) -> None:
        self.client, self.ttl_ms = client, int(ttl_s * 1000)
        self.key = cached_blocks_key(model, worker_id)
        self.load_key = routing_load_key(model, worker_id)
        self._load: int | None = None
        self._events: deque[tuple[bool, bytes]] = kv.pool.watch()
        self._fresh = True  # a restarted worker's old set goes first
        # The main loop flushes after a step that cached blocks (peers should see them
        # before the next request with that prefix arrives), the heartbeat thread on
        # every beat (the TTL); one at a time, so changes reach Redis in order.
        self._lock = threading.Lock()

    @property
    def pending(self) -> bool:
        return bool(self._events)

    def set_load(self, tasks: int) -> None:
        """The tasks the worker holds (main loop; written only when it changed)."""
        if tasks != self._load:
            self.client.set(self.load_key, tasks, px=self.ttl_ms)
            self._load = tasks

    def flush(self) -> None:
        """Apply the cache's changes since the last flush (the pool appends to a deque,
        which is safe to drain from another thread)."""
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        taken = []
        while self._events:
            taken.append(self._events.popleft())
        present: dict[bytes, bool] = {}
        for added, block_hash in taken:
            present[block_hash[:PUBLISHED_HASH_BYTES]] = added
        pipe = self.client.pipeline(transaction=False)
        if self._fresh:
            pipe.delete(self.key)
        gone = [h for h, added in present.items() if not added]
        new = [h for h, added in present.items() if added]
        if gone:
            pipe.srem(self.key, *gone)
        if new:
            pipe.sadd(self.key, *new)
        pipe.pexpire(self.key, self.ttl_ms)
        pipe.pexpire(self.load_key, self.ttl_ms)
        try:
            pipe.execute()
        except redis.RedisError:
            self._events.extendleft(reversed(taken))  # next heartbeat sends them again
            raise
        self._fresh = False


class PrefixRouter:
    """Decides whether this worker leaves the backlog's task for a peer."""

    def __init__(
        self,
        client: redis.Redis,
        model: str,
        worker_id: str,
        kv: KVCacheManager,
        wait_ms: float,
        peers_ttl_s: float = 1.0,
        role: str = "prefill",
    ) -> None:
        self.client, self.model, self.worker_id, self.kv = client, model, worker_id, kv
        self.role = role  # the role of this worker, hence of the peers it leaves tasks to
        self.wait_ms = wait_ms
        self.peers_ttl_s = peers_ttl_s
        self._peers: list = []
        self._peers_at = float("-inf")
        # (entry id, defer, when) of the last look: reused until the view of the peers
        # is refreshed, so a holder that died meanwhile stops being waited for.
        self._decided: tuple[bytes, bool, float] | None = None
        self.num_deferred = 0  # tasks left for a peer (see defers)

    def defers(self, backlog: Backlog | None, my_load: int) -> bool:
        """True: leave `backlog`'s task to a decode worker that would prefill what
        its cache lacks of it itself, or to a peer of this worker's role that holds
        more of its prefix and no more tasks than `my_load` (the tasks this worker
        holds), or as much of it and BALANCE_MARGIN fewer tasks."""
        if backlog is None or backlog.task is None or backlog.age_ms >= self.wait_ms:
            return False
        now = time.monotonic()
        last = self._decided
        same = last is not None and last[0] == backlog.entry_id
        if same and now - last[2] < self.peers_ttl_s:
            return last[1]
        defer = self._better_peer(backlog, my_load)
        self._decided = (backlog.entry_id, defer, now)
        self.num_deferred += defer and not (same and last[1])  # once per task left
        return defer

    def _better_peer(self, backlog: Backlog, my_load: int) -> bool:
        task = backlog.task
        tokens = task.prompt_token_ids + task.output_token_ids
        peers = [p for p in self.live_peers() if p.role in (self.role, "decode")]
        if not peers:
            return False
        chain = self.kv.usable_chain(tokens, task.sampling.cache_salt)
        mine = self.kv.num_cached_leading(chain)
        short = [h[:PUBLISHED_HASH_BYTES] for h in chain]
        pipe = self.client.pipeline(transaction=False)
        for peer in peers:
            pipe.get(routing_load_key(self.model, peer.worker_id))
            if short:
                pipe.smismember(cached_blocks_key(self.model, peer.worker_id), short)
        answers = iter(pipe.execute())
        for peer in peers:
            load = int(next(answers) or 0)
            held = leading_present(next(answers)) if short else 0
            if peer.role == "decode":
                uncached = len(tokens) - held * self.kv.block_size
                if uncached <= peer.local_prefill_uncached_tokens and (
                    load < peer.max_local_prefills
                ):
                    return True  # it prefills the rest itself: nothing to ship
            elif (held > mine and load <= my_load) or (
                held == mine and load + BALANCE_MARGIN <= my_load
            ):
                return True
        return False

    def live_peers(self) -> list:
        """Live workers that read the stream, this one aside: prefill and colocated
        workers, and decode workers that prefill short remainders (refreshed at most
        every peers_ttl_s, or NO_PEERS_TTL_S while there are none). Tasks are left only
        to some of them (_better_peer)."""
        now = time.monotonic()
        ttl = self.peers_ttl_s if self._peers else min(self.peers_ttl_s, NO_PEERS_TTL_S)
        if now - self._peers_at > ttl:
            self._peers = [
                w
                for w in list_workers(self.client)
                if (w.role != "decode" or w.local_prefill_uncached_tokens)
                and w.model == self.model
                and w.worker_id != self.worker_id
                and not w.draining
            ]
            self._peers_at = now
        return self._peers


class WorkerRouting:
    """A prefill or colocated worker's side of routing: what it publishes, and whether
    it reads."""

    LOOK_S = 0.01  # a task left for a peer: look at it again after this
    IDLE_WAIT_MS = 50  # no task waits: wait this long at most for one (see pause)

    def __init__(
        self, client: redis.Redis, model: str, worker_id: str, kv: KVCacheManager, config
    ) -> None:
        self.publisher = HashPublisher(client, model, worker_id, kv, config.registry_ttl_s)
        self._nothing_waits = False  # what the last room() saw
        self.router = PrefixRouter(
            client,
            model,
            worker_id,
            kv,
            config.prefix_route_wait_ms,
            config.heartbeat_s,
            config.role,
        )

    @classmethod
    def of(
        cls, client: redis.Redis, model: str, worker_id: str, kv: KVCacheManager, config
    ) -> WorkerRouting | None:
        """None when prefix caching or routing (`config.prefix_route_wait_ms`) is off."""
        if not kv.enable_prefix_caching or not config.prefix_route_wait_ms:
            return None
        return cls(client, model, worker_id, kv, config)

    @property
    def active(self) -> bool:
        """Whether another live worker reads the stream. Without one the worker reads
        as it would without routing (blocking when idle); with one it never blocks in
        a read (see room), and neither does any other routing worker, so none takes
        a new task unjudged. (A worker with routing off still blocks: one that only
        peeks loses every new task to it.) False while Redis is unreachable."""
        try:
            return bool(self.router.live_peers())
        except redis.RedisError as exc:
            log.warning("routing off while the registry is unreadable: %s", exc)
            return False

    def new_tasks(self, intake: TaskIntake, load: int) -> int:
        """How many new tasks to read now (TaskIntake.poll's `new`): 1, the oldest
        waiting, which this worker keeps; or 0 when none waits (a read would take one
        that arrives meanwhile unjudged) or the oldest is left for a peer
        (PrefixRouter.defers). One at a time, since only the oldest is judged: the
        caller reads again at once while it has room. Reclaimed tasks (a dead
        peer's) are not judged, and not limited by this. The read must not block: a
        blocked reader gets the next task whoever holds its prefix."""
        backlog = intake.backlog()
        self._nothing_waits = backlog is None
        if backlog is None:
            return 0
        try:
            return 0 if self.router.defers(backlog, load) else 1
        except redis.RedisError as exc:  # read as if routing were off
            log.warning("could not look up the peers' cached blocks: %s", exc)
            return 1

    def pause(self, intake: TaskIntake) -> None:
        """After new_tasks() said read none: while a task is left for a peer, look again
        in LOOK_S; while none waits, until one arrives (TaskIntake.wait_for_task, woken
        by the XADD, so an idle worker takes a new request at once) or IDLE_WAIT_MS."""
        if self._nothing_waits:
            intake.wait_for_task(self.IDLE_WAIT_MS)
        else:
            time.sleep(self.LOOK_S)

    def publish(self, load: int) -> None:
        """Blocks cached since the last call and the tasks held now, to Redis at once
        (main loop, after a step or a read): a peer deciding where the next request
        with this prefix goes must see them; the heartbeat would be late."""
        try:
            self.publisher.set_load(load)
            if self.publisher.pending:
                self.publisher.flush()
        except redis.RedisError as exc:  # the heartbeat sends the blocks later
            log.warning("could not publish cached blocks: %s", exc)


def leading_present(found: list) -> int:
    """How many of the first blocks are present, up to the first missing one."""
    n = 0
    for present in found:
        if not int(present):
            break
        n += 1
    return n
