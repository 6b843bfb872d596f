"""When a batched step raises, find the request that made it raise and fail only that one.

One request the engine cannot run (a sampling value past every check, a token the
model chokes on, a bug reached by one shape) would otherwise fail every request batched
with it. So a step that raised is run again on halves of its batch, and halves of the
halves that raise, down to the single requests that fail alone: those are the culprits,
every other chunk keeps the result of the sub-batch that ran it.

Running a chunk again is safe because nothing a step mutates is touched before its
results are applied: the scheduler's state moves only in `Scheduler.update`, after the
runs, and the forward pass writes each chunk's KV only into that chunk's own slots
(positions start..start+n of its sequence, blocks no other request shares yet), so a run
again writes the same values into the same slots. Only unseeded random sampling draws
again, which is no promise broken.

Bounded: at most `MAX_RERUNS` sub-batches run for one failed step (two per halving, so a
single culprit in up to 256 sequences is found); chunks still unresolved then fail with
the culprits. A device fault that fails everything costs at most that many re-runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from tandem.core.scheduler import ScheduledChunk, SchedulerOutput
from tandem.core.sequence import Sequence

log = logging.getLogger(__name__)

MAX_RERUNS = 16

Sampled = dict[str, int]
Logprobs = dict[str, dict[int, float]]
# Runs some chunks of a step on their own: their sampled tokens and logprobs, or raises.
RunChunks = Callable[[list[ScheduledChunk]], tuple[Sampled, Logprobs]]


class StepFailed(Exception):
    """A step raised for `request_ids` (still in the scheduler: the caller ends them with
    an error, which frees their blocks). The rest of the step was applied: `out` is its
    schedule (its `preempted` still need handling) and `got` the sequences that received
    a token, as `Engine.step` returns them."""

    reason = "the worker failed to compute this request (its log says why)"  # for clients

    def __init__(
        self,
        request_ids: list[str],
        out: SchedulerOutput | None = None,
        got: list[Sequence] | None = None,
    ) -> None:
        super().__init__(f"a step failed for {len(request_ids)} sequence(s)")
        self.request_ids = request_ids
        self.out = out if out is not None else SchedulerOutput()
        self.got = got or []


def isolate(
    chunks: list[ScheduledChunk], run: RunChunks, max_reruns: int = MAX_RERUNS
) -> tuple[Sampled, Logprobs, list[str]]:
    """`chunks` failed together: run halves of them again through `run` until the chunks
    that fail alone are found. Returns the tokens and logprobs of every sub-batch that
    ran, and the request ids of the culprits (with any left unresolved by the bound)."""
    sampled: Sampled = {}
    logprobs: Logprobs = {}
    culprits: list[str] = []
    reruns = 0
    failed = [chunks]
    while failed:
        group = failed.pop()
        if len(group) == 1:
            culprits.append(group[0].seq.request_id)
            continue
        mid = len(group) // 2
        for half in (group[:mid], group[mid:]):
            if reruns >= max_reruns:
                culprits.extend(c.seq.request_id for c in half)
                continue
            reruns += 1
            try:
                tokens, lp = run(half)
            except Exception as exc:
                log.warning("a sub-batch of %d sequence(s) failed again: %r", len(half), exc)
                failed.append(half)
                continue
            sampled.update(tokens)
            logprobs.update(lp)
    log.warning(
        "step isolation: %d of %d sequence(s) failed (%d re-runs): %s",
        len(culprits),
        len(chunks),
        reruns,
        culprits,
    )
    return sampled, logprobs, culprits
