import subprocess
import sys

import msgspec
import pytest

from tandem.core.protocol import (
    ControlMessage,
    Handoff,
    KVLayout,
    PrefillTask,
    ReserveRequest,
    TokenBatch,
    TokenDelta,
    decode,
    encode,
)
from tandem.core.sampling_params import SamplingParams
from tandem.core.sequence import Sequence


def test_core_imports_no_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import tandem.core.config, tandem.core.protocol, tandem.core.scheduler, tandem.core.block_pool, "
        "tandem.core.kv_cache_manager, tandem.core.sequence, tandem.core.redis_keys, tandem.core.tokenizer, "
        "tandem.core.replies, tandem.core.task_intake, tandem.core.local_prefill\n"
        "print('ok')"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def _layout(**kw):
    base = dict(model="m", dtype="float32", block_size=16, num_layers=2, num_kv_heads=2, head_dim=8)
    base.update(kw)
    return KVLayout(**base)


def test_control_messages_round_trip_through_the_tagged_union():
    task = PrefillTask(
        request_id="x",
        prompt_token_ids=[1, 2],
        sampling=SamplingParams(seed=3),
        reply_stream="s",
        deadline=1.5,
    )
    for msg in (
        ReserveRequest(request_id="x", num_tokens=5, layout=_layout(), lease_s=2.0),
        Handoff(task=task, output_token_ids=[4], num_computed_tokens=2),
    ):
        assert decode(encode(msg), ControlMessage) == msg


def test_decoders_reject_malformed_and_oversized_frames():
    with pytest.raises(ValueError):
        decode(b"\xc1garbage", ControlMessage)
    with pytest.raises(ValueError):
        decode(msgspec.msgpack.encode({"type": "Nope"}), ControlMessage)
    big = encode(TokenBatch([TokenDelta(request_id="a", token_ids=list(range(1000)))]))
    with pytest.raises(ValueError):
        decode(big, TokenBatch, max_bytes=100)
    assert decode(big, TokenBatch).deltas[0].token_ids[-1] == 999


def test_layout_mismatch_names_the_field():
    assert _layout().mismatch(_layout()) is None
    assert "dtype" in _layout().mismatch(_layout(dtype="bfloat16"))


@pytest.mark.parametrize(
    "kw",
    [
        dict(max_tokens=0),
        dict(temperature=-1.0),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(min_p=2.0),
        dict(stop=tuple("abcdefghijklmnopq")),
        dict(stop=("",)),
        dict(stop=("x" * 300,)),
        dict(repetition_penalty=0.0),
        dict(presence_penalty=3.0),
        dict(logprobs=50),
        dict(min_tokens=20, max_tokens=10),
    ],
)
def test_sampling_params_reject_bad_values(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw).validate()


def test_sampling_params_context_and_vocab_bounds():
    SamplingParams(max_tokens=10).validate(max_model_len=20, prompt_len=10)
    with pytest.raises(ValueError, match="exceeds"):
        SamplingParams(max_tokens=11).validate(max_model_len=20, prompt_len=10)
    with pytest.raises(ValueError):
        SamplingParams(stop_token_ids=(100,)).validate_vocab(100)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=101).validate_vocab(100)
    SamplingParams(top_k=100).validate_vocab(100)


def test_a_sequence_of_a_task_copies_its_tokens_and_takes_a_handoffs_progress():
    task = PrefillTask(
        request_id="x", prompt_token_ids=[1, 2, 3], sampling=SamplingParams(), reply_stream="s",
        deadline=0.0, output_token_ids=[7],
    )  # fmt: skip
    seq = Sequence.of_task(task)
    assert (seq.request_id, seq.all_token_ids, seq.num_computed_tokens) == ("x", [1, 2, 3, 7], 0)
    seq.append_token(8)  # the sequence owns its lists: the task stays as it came
    assert task.output_token_ids == [7] and seq.sampling is task.sampling
    handed = Sequence.of_task(task, [7, 8], num_computed_tokens=4)
    assert (handed.all_token_ids, handed.num_computed_tokens) == ([1, 2, 3, 7, 8], 4)
