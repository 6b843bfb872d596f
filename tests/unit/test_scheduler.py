import pytest

from tandem.core.config import SchedulerConfig
from tandem.core.sequence import FinishReason, SequenceStatus
from tests.unit.helpers import create_requests, create_scheduler, run_step


def test_prefill_then_decode_until_length():
    sched = create_scheduler()
    (seq,) = create_requests(1, prompt_len=6, max_tokens=3)
    sched.add(seq)
    out, got = run_step(sched)
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(0, 6)]
    assert got == [seq] and seq.output_token_ids == [7]
    out, _ = run_step(sched)
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(6, 1)]
    run_step(sched)
    assert seq.finish_reason is FinishReason.LENGTH and seq.is_finished
    assert sched.kv.num_used_blocks == 0 and not sched.has_work


def test_token_budget_chunks_long_prefills_and_decodes_go_first():
    sched = create_scheduler(max_num_batched_tokens=10)
    a, b = create_requests(2, prompt_len=8, max_tokens=5)
    sched.add(a)
    run_step(sched)  # a prefilled (8 tokens)
    sched.add(b)
    out, _ = run_step(sched)
    # a decodes first (1 token), b gets the remaining 9 - capped at its 8 prompt tokens.
    assert [(c.seq.request_id, c.num_tokens) for c in out.chunks] == [("r0", 1), ("r1", 8)]
    (c,) = create_requests(1, prompt_len=30, max_tokens=2, prefix="c")
    sched.add(c)
    out, _ = run_step(sched)
    assert [(x.seq.request_id, x.num_tokens) for x in out.chunks] == [
        ("r0", 1),
        ("r1", 1),
        ("c0", 8),
    ]
    assert not out.chunks[-1].samples
    out, _ = run_step(sched)
    assert out.chunks[-1].seq is c and out.chunks[-1].start == 8


def test_prefill_cap_limits_prompt_tokens_per_step_but_not_decodes():
    sched = create_scheduler(max_num_batched_tokens=64, max_prefill_tokens=6, max_num_seqs=16)
    decoders = create_requests(8, prompt_len=4, max_tokens=20)
    for seq in decoders:
        sched.add(seq)
    steps = 0
    while any(s.num_uncomputed_tokens > 1 or not s.output_token_ids for s in decoders):
        out, _ = run_step(sched)
        assert sum(c.num_tokens for c in out.chunks if c.num_tokens > 1) <= 6
        steps += 1
    assert steps == 6  # 32 prompt tokens, 6 a step
    long_a, long_b = create_requests(2, prompt_len=10, max_tokens=2, prefix="p")
    sched.add(long_a)
    sched.add(long_b)
    prompt_chunks = []
    for _ in range(4):
        out, _ = run_step(sched)
        decodes = {c.seq.request_id for c in out.chunks if c.num_tokens == 1}
        assert {s.request_id for s in decoders} <= decodes  # every decode, every step
        prompt_chunks.append(
            [(c.seq.request_id, c.num_tokens) for c in out.chunks if c.num_tokens > 1]
        )
    # The cap chunks the prompts (the last two tokens of p1 are one 2-token chunk).
    assert prompt_chunks == [[("p0", 6)], [("p0", 4), ("p1", 2)], [("p1", 6)], [("p1", 2)]]


def test_max_num_seqs_limits_admission():
    sched = create_scheduler(max_num_seqs=2)
    for s in create_requests(3):
        sched.add(s)
    out, _ = run_step(sched)
    assert len(out.chunks) == 2 and len(sched.waiting) == 1


def test_preemption_picks_youngest_and_recomputes():
    # 6 blocks of 4 tokens: two sequences of 8-token prompts take 4 blocks; growing
    # both past 12 tokens needs 6, past 16 needs 8 -> the younger is preempted.
    sched = create_scheduler(num_blocks=6, block_size=4, max_num_batched_tokens=64)
    old, young = create_requests(2, prompt_len=8, max_tokens=12)
    sched.add(old)
    sched.add(young)
    preempted = []
    for _ in range(40):
        if not sched.has_work:
            break
        out, _ = run_step(sched)
        preempted += out.preempted
        assert sched.kv.num_used_blocks <= 6
    assert preempted and all(p is young for p in preempted)
    assert old.finish_reason is FinishReason.LENGTH
    assert young.finish_reason is FinishReason.LENGTH
    assert len(young.output_token_ids) == 12 and young.num_preemptions >= 1
    assert sched.kv.num_used_blocks == 0


def test_decode_worker_mode_hands_preempted_back():
    sched = create_scheduler(num_blocks=7, block_size=4, requeue_preempted=False)
    a, b = create_requests(2, prompt_len=7, max_tokens=20)
    for s in (a, b):
        s.append_token(5)
        s.num_computed_tokens = 7
        sched.kv.allocate_slots(s.request_id, 8)
        sched.add_running(s)
    preempted = []
    for _ in range(6):  # at position 12 both need a fourth block: only one fits
        out, _ = run_step(sched)
        preempted += out.preempted
    assert (
        preempted == [b]
        and a.status is SequenceStatus.RUNNING
        and b.status is SequenceStatus.FINISHED
    )
    assert b not in sched.waiting and not sched.kv.owns("r1")


def test_eos_and_stop_token_ids_and_min_tokens():
    sched = create_scheduler(eos=frozenset({7}))
    (a,) = create_requests(1, max_tokens=5, prefix="a")
    a.sampling = a.sampling.__class__(max_tokens=5, temperature=0.0)  # eos honoured
    (b,) = create_requests(1, max_tokens=5, prefix="b", stop_token_ids=(9,))
    (c,) = create_requests(1, max_tokens=5, prefix="c")
    c.sampling = c.sampling.__class__(max_tokens=5, temperature=0.0, min_tokens=3)
    for s in (a, b, c):
        sched.add(s)
    out = sched.schedule()
    sched.update(out, {"a0": 7, "b0": 9, "c0": 7})
    assert a.finish_reason is FinishReason.STOP
    assert b.finish_reason is FinishReason.STOP
    assert not c.is_finished  # min_tokens holds EOS back
    for _ in range(2):
        out = sched.schedule()
        sched.update(out, {"c0": 7})
    assert c.finish_reason is FinishReason.STOP and len(c.output_token_ids) == 3


def test_abort_frees_blocks_wherever_the_request_is():
    sched = create_scheduler(max_num_seqs=1)
    a, b = create_requests(2)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert sched.abort("r1") is b and b.finish_reason is FinishReason.ABORT
    assert sched.abort("r0") is a
    sched.update(out, {"r0": 7})  # a step that finishes after the abort is ignored
    assert a.output_token_ids == [] and sched.kv.num_used_blocks == 0
    assert sched.abort("nope") is None


def test_too_long_request_rejected_up_front():
    import pytest

    sched = create_scheduler(num_blocks=2, block_size=4, max_model_len=100)
    (s,) = create_requests(1, prompt_len=8, max_tokens=50)
    with pytest.raises(ValueError):
        sched.add(s)


def test_room_counts_free_slots_and_blocks_beyond_what_is_in_hand():
    # 16 blocks of 4 tokens, 4 sequences at most.
    sched = create_scheduler(num_blocks=16, block_size=4, max_num_seqs=4, max_num_batched_tokens=64)
    assert sched.room() == 4  # slots bound it
    a, b = create_requests(2, prompt_len=19, max_tokens=8)
    sched.add(a)
    # a's 19 prompt tokens and one more need 5 blocks: 11 free beyond them, 3 slots.
    assert sched.room() == 3
    sched.add(b)
    assert sched.room() == 2
    run_step(sched)  # both prefilled into 5 blocks each; one more token each needs a 6th
    assert sched.kv.num_free_blocks == 6 and sched.room() == 2
    (c,) = create_requests(1, prompt_len=23, max_tokens=4, prefix="c")
    sched.add(c)  # c needs 6 blocks: with a's and b's next ones, 8 of the 6 free
    assert sched.room() == 0


def test_room_is_none_while_a_steps_budget_of_prompts_waits():
    sched = create_scheduler(max_num_batched_tokens=16, max_num_seqs=8)
    (a,) = create_requests(1, prompt_len=15)
    sched.add(a)
    assert sched.room() > 0
    (b,) = create_requests(1, prompt_len=1, prefix="b")
    sched.add(b)
    assert sched.room() == 0
    run_step(sched)  # both admitted: nothing waits any more
    assert sched.room() == 6


def test_room_counts_the_prefill_cap_not_the_whole_budget():
    sched = create_scheduler(max_num_batched_tokens=64, max_prefill_tokens=8, max_num_seqs=8)
    (a,) = create_requests(1, prompt_len=7)
    sched.add(a)
    assert sched.room() > 0
    (b,) = create_requests(1, prompt_len=1, prefix="b")
    sched.add(b)
    assert sched.room() == 0  # a step's 8 prompt tokens wait, far below the 64 budget


def test_prefill_cap_is_validated_and_bounded_by_the_budget():
    assert SchedulerConfig(max_num_batched_tokens=512).prefill_budget == 512
    assert SchedulerConfig(max_num_batched_tokens=512, max_prefill_tokens=128).prefill_budget == 128
    assert (
        SchedulerConfig(max_num_batched_tokens=512, max_prefill_tokens=4096).prefill_budget == 512
    )
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        SchedulerConfig(max_prefill_tokens=-1)
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        SchedulerConfig(
            max_num_batched_tokens=8192,
            max_model_len=8192,
            enable_chunked_prefill=False,
            max_prefill_tokens=512,
        )
