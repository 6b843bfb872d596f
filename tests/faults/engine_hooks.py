"""Faults injected into a real worker's engine, for tests of what the worker does when
its own engine misbehaves (nothing in the service reads a test switch). Installed by
tests.faults.hooked_worker (a hand-started worker) and by tests/faults/serve_hooks
(the workers of `tandem serve`).

fail_token(T, PATH): the sampler raises (as it did for a top_k of 2**63) for every batch
  holding a request whose prompt starts with token T once that request has FAIL_AFTER
  tokens (so it is decoding beside requests started before it); each such batch's size
  is appended to PATH, so a test can tell what it was batched with.
hold_steps(PATH): while PATH exists, a step about to run on the device waits (a prefill
  as long as the test wants, in a worker that is otherwise alive: its other threads run).
"""

from __future__ import annotations

import os
import time

FAIL_AFTER = 4


def fail_token(token: int, record: str) -> None:
    from tandem.engine import model_runner

    real = model_runner.sample_tokens

    def sample_tokens(logits, rows, generator):
        if any(
            r.prompt_token_ids[0] == token and len(r.output_token_ids) >= FAIL_AFTER for r in rows
        ):
            with open(record, "a") as out:
                out.write(f"{len(rows)}\n")
            raise OverflowError("Overflow when unpacking long long (injected)")
        return real(logits, rows, generator)

    model_runner.sample_tokens = sample_tokens


def hold_steps(path: str) -> None:
    from tandem.engine.model_runner import ModelRunner

    real = ModelRunner.launch

    def launch(self, inputs):
        while os.path.exists(path):
            time.sleep(0.05)
        return real(self, inputs)

    ModelRunner.launch = launch
