"""The OpenAI-style HTTP API through the official `openai` client, against the fake worker.

The fake worker answers with the prompt's own tokens, cycled, so every expected text is
known in advance; what reached the worker (sampling fields, chat template) is checked
on the tasks it recorded.
"""

from __future__ import annotations

import openai
import pytest

from tandem.core.tokenizer import Tokenizer
from tests.gateway.conftest import MODEL, Gateway
from tests.gateway.fake_worker import FakeWorker, expected_output

PROMPT = "Tandem streams 世界 and 🙂🚀 to clients, naïvely."
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a river in Spain 🙂"},
]


@pytest.fixture
def client(gateway: Gateway) -> openai.OpenAI:
    with openai.OpenAI(
        base_url=gateway.http_url + "/v1", api_key="unused", max_retries=0, timeout=10
    ) as c:
        yield c


def expected_text(tokenizer: Tokenizer, prompt_ids: list[int], max_tokens: int) -> str:
    return tokenizer.decode(expected_output(prompt_ids, max_tokens))


def test_completion(client: openai.OpenAI, fake_worker: FakeWorker, tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(PROMPT)
    res = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12)
    assert res.object == "text_completion" and res.id.startswith("cmpl-")
    assert res.model == MODEL
    [choice] = res.choices
    assert choice.index == 0
    assert choice.text == expected_text(tokenizer, ids, 12)
    assert choice.finish_reason == "length"
    assert choice.logprobs is None
    assert (res.usage.prompt_tokens, res.usage.completion_tokens) == (len(ids), 12)
    assert res.usage.total_tokens == len(ids) + 12
    assert fake_worker.tasks[-1].prompt_token_ids == ids


def test_completion_stream_adds_up_to_the_whole_answer(
    client: openai.OpenAI, fake_worker: FakeWorker, tokenizer: Tokenizer
) -> None:
    fake_worker.token_delay_s = 0.01
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0)
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert len(chunks) > 5  # streamed, not all at once
    *body, usage_chunk = chunks
    assert "".join(c.choices[0].text for c in body) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in body][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    assert all(c.usage is None for c in body)
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == 20
    assert usage_chunk.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert len({c.id for c in chunks}) == 1


def test_completion_stream_coalesces_tokens_that_queued_together(
    client: openai.OpenAI, fake_worker: FakeWorker, tokenizer: Tokenizer
) -> None:
    """Several tokens of a stream pending at once go out as one SSE chunk."""
    fake_worker.tokens_per_step = 4  # four one-token deltas per request in each batch
    fake_worker.token_delay_s = 0.01
    ids = tokenizer.encode(PROMPT)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected_text(tokenizer, ids, 24)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert 0 < len(chunks) <= 24 // 4


def test_chat_uses_the_chat_template(
    client: openai.OpenAI, fake_worker: FakeWorker, tokenizer: Tokenizer
) -> None:
    ids = tokenizer.encode_chat(MESSAGES)
    res = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=9)
    assert res.object == "chat.completion" and res.id.startswith("chatcmpl-")
    [choice] = res.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == expected_text(tokenizer, ids, 9)
    assert choice.finish_reason == "length"
    assert res.usage.prompt_tokens == len(ids)
    assert fake_worker.tasks[-1].prompt_token_ids == ids


def test_chat_stream_adds_up_and_starts_with_the_role(
    client: openai.OpenAI, fake_worker: FakeWorker, tokenizer: Tokenizer
) -> None:
    whole = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=15, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_completion_tokens=15, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert fake_worker.tasks[-1].sampling.max_tokens == 15


def test_chat_without_max_tokens_may_use_the_rest_of_the_context(
    client: openai.OpenAI, fake_worker: FakeWorker, gateway: Gateway, tokenizer: Tokenizer
) -> None:
    fake_worker.token_delay_s = 0
    client.chat.completions.create(model=MODEL, messages=MESSAGES, stop=["Spain"])
    limit = gateway.app.limits.max_model_len
    assert fake_worker.tasks[-1].sampling.max_tokens == limit - len(tokenizer.encode_chat(MESSAGES))


def test_sampling_fields_reach_the_worker(client: openai.OpenAI, fake_worker: FakeWorker) -> None:
    client.completions.create(
        model=MODEL, prompt="abc", max_tokens=5, temperature=0.7, top_p=0.9, seed=11,
        presence_penalty=0.5, frequency_penalty=-0.5,
        extra_body={"top_k": 40, "min_p": 0.05, "ignore_eos": True, "min_tokens": 2,
                    "repetition_penalty": 1.1, "stop_token_ids": [7]},
    )  # fmt: skip
    sp = fake_worker.tasks[-1].sampling
    assert (sp.max_tokens, sp.top_k, sp.seed, sp.ignore_eos, sp.min_tokens) == (5, 40, 11, True, 2)
    assert sp.temperature == pytest.approx(0.7) and sp.top_p == pytest.approx(0.9)
    assert sp.min_p == pytest.approx(0.05) and sp.repetition_penalty == pytest.approx(1.1)
    assert sp.presence_penalty == 0.5 and sp.frequency_penalty == -0.5
    assert sp.stop_token_ids == (7,) and sp.logprobs is None
    # Unset fields: OpenAI's defaults.
    client.completions.create(model=MODEL, prompt="abc")
    sp = fake_worker.tasks[-1].sampling
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.seed) == (16, 1.0, 1.0, 0, None)


def test_n_choices_are_separate_requests_with_their_own_seeds(
    client: openai.OpenAI, fake_worker: FakeWorker, tokenizer: Tokenizer
) -> None:
    res = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, n=3, seed=5)
    assert [c.index for c in res.choices] == [0, 1, 2]
    want = expected_text(tokenizer, tokenizer.encode(PROMPT), 6)
    assert all(c.text == want for c in res.choices)
    tasks = fake_worker.tasks[-3:]
    assert sorted(t.sampling.seed for t in tasks) == [5, 6, 7]
    assert len({t.request_id for t in tasks}) == 3
    assert res.usage.completion_tokens == 18
    assert res.usage.prompt_tokens == len(tokenizer.encode(PROMPT))  # counted once


def test_token_id_prompts_and_batches(
    client: openai.OpenAI, fake_worker: FakeWorker, tokenizer: Tokenizer
) -> None:
    ids = tokenizer.encode("Hello there, general Kenobi")
    res = client.completions.create(model=MODEL, prompt=ids, max_tokens=4)
    assert res.choices[0].text == expected_text(tokenizer, ids, 4)
    assert fake_worker.tasks[-1].prompt_token_ids == ids

    res = client.completions.create(model=MODEL, prompt=["one two", "three four five"], n=2,
                                    max_tokens=3)  # fmt: skip
    texts = [c.text for c in sorted(res.choices, key=lambda c: c.index)]
    one, three = (expected_text(tokenizer, tokenizer.encode(p), 3)
                  for p in ("one two", "three four five"))  # fmt: skip
    assert texts == [one, one, three, three]


def test_stop_strings_cut_the_text(
    client: openai.OpenAI, fake_worker: FakeWorker, redis_client
) -> None:
    fake_worker.token_delay_s = 0.02
    prompt = "one two three four five six seven eight nine ten"
    res = client.completions.create(model=MODEL, prompt=prompt, max_tokens=200, stop="four f")
    assert res.choices[0].text == "one two three "
    assert res.choices[0].finish_reason == "stop"
    res = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=200,
        stop=["three", "two"], stream=True,
    )  # fmt: skip
    chunks = list(res)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert "two" not in "".join(c.choices[0].delta.content or "" for c in chunks)


def test_completion_logprobs(
    client: openai.OpenAI, fake_worker: FakeWorker, tokenizer: Tokenizer
) -> None:
    res = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=4, logprobs=1)
    lp = res.choices[0].logprobs
    tokens = expected_output(tokenizer.encode("Hello world"), 4)
    assert lp.tokens == [tokenizer.decode([t]) for t in tokens]
    assert lp.token_logprobs == [-0.5] * 4
    # The fake worker's alternatives: the token itself at -0.5, the next id at -1.5.
    assert lp.top_logprobs == [{tokenizer.decode([t]): -0.5} for t in tokens]
    assert lp.text_offset == [sum(len(x) for x in lp.tokens[:i]) for i in range(4)]
    assert fake_worker.tasks[-1].sampling.logprobs == 1


def test_chat_logprobs_carry_bytes(
    client: openai.OpenAI, fake_worker: FakeWorker, tokenizer: Tokenizer
) -> None:
    messages = [{"role": "user", "content": "世界"}]
    res = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=30, logprobs=True, top_logprobs=2
    )
    content = res.choices[0].logprobs.content
    tokens = expected_output(tokenizer.encode_chat(messages), 30)
    assert len(content) == 30
    assert all(e.logprob == -0.5 for e in content)
    assert [len(e.top_logprobs) for e in content] == [2] * 30
    assert [e.top_logprobs[1].logprob for e in content] == [-1.5] * 30
    # Bytes of all tokens together are the UTF-8 of the text, characters split or not.
    raw = b"".join(bytes(e.bytes) for e in content)
    assert raw.decode("utf-8") == tokenizer.decode(tokens, skip_special_tokens=False)
    assert fake_worker.tasks[-1].sampling.logprobs == 2


def test_models(client: openai.OpenAI, gateway: Gateway) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")
