"""The OpenAI-style HTTP API of the real service (`tandem serve` on SmolLM2, CPU), through
the official `openai` client: answers equal the in-process engine's."""

from __future__ import annotations

import json
import socket
import time
import urllib.request

import openai
import pytest

from tandem.core.redis_client import connect
from tandem.core.registry import list_workers
from tandem.core.sampling_params import SamplingParams
from tandem.engine.llm import LLM
from tests.service.conftest import assert_every_worker_clean, start_service, stop_service

PROMPTS = ["The history of the Roman Empire", "def fibonacci(n):"]
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def svc():
    service = start_service()
    try:
        yield service
    finally:
        stop_service(service)


@pytest.fixture(scope="module")
def client(svc):
    with openai.OpenAI(base_url=svc.http_url + "/v1", api_key="none", max_retries=0,
                       timeout=120) as c:  # fmt: skip
        yield c


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def test_banner_names_the_http_endpoint(svc) -> None:
    banner = next(line for line in svc.log if line.startswith("tandem ready:"))
    assert f"http={svc.http}" in banner
    # The banner's next lines may still be on their way through the log reader.
    deadline = time.monotonic() + 10
    while not any("curl" in line for line in svc.log) and time.monotonic() < deadline:
        time.sleep(0.05)
    curl = next(line for line in svc.log if "curl" in line)
    assert f"http://{svc.http}/v1/completions" in curl and '"model": "smollm2"' in curl


def test_greedy_completion_equals_the_engine(client: openai.OpenAI, engine: LLM) -> None:
    want = engine.generate(PROMPTS, greedy(20))
    for prompt, solo in zip(PROMPTS, want, strict=True):
        res = client.completions.create(model="smollm2", prompt=prompt, max_tokens=20,
                                        temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
        assert res.choices[0].text == solo.text
        assert res.choices[0].finish_reason == "length"
        assert res.usage.prompt_tokens == len(solo.prompt_token_ids)
        assert res.usage.completion_tokens == 20
    ids = engine.encode("Les fleurs du printemps")
    res = client.completions.create(model="smollm2", prompt=ids, max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True})  # fmt: skip
    assert res.choices[0].text == engine.generate([ids], greedy(8))[0].text


def test_greedy_stream_adds_up_to_the_whole_answer(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="smollm2", prompt=PROMPTS[1], max_tokens=16,
                                      temperature=0)  # fmt: skip
    chunks = list(client.completions.create(
        model="smollm2", prompt=PROMPTS[1], max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    assert len(chunks) > 3
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_equals_the_engine_on_the_chat_template(client: openai.OpenAI, engine: LLM) -> None:
    ids = engine.tokenizer.encode_chat(MESSAGES)
    want = engine.generate([ids], SamplingParams(temperature=0, max_tokens=24))[0]
    res = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=24,
                                         temperature=0)  # fmt: skip
    assert res.choices[0].message.content == want.text
    assert res.usage.prompt_tokens == len(ids)
    assert res.choices[0].finish_reason == want.finish_reason
    streamed = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=24,
                                              temperature=0, stream=True)  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == want.text


def test_bad_requests_get_openai_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="smollm2", prompt="hi", max_tokens=9000)
    assert info.value.status_code == 400
    assert info.value.body["code"] == "context_length_exceeded"
    assert "exceeds the model context" in info.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi")


def test_disconnect_mid_stream_frees_the_blocks(svc) -> None:
    host, port = svc.http.rsplit(":", 1)
    body = json.dumps(
        {
            "prompt": "Tell me a very long story about dragons.",
            "max_tokens": 400,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
    ).encode()
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
        b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    received = b""
    while received.count(b"data: ") < 5:
        received += sock.recv(4096)
    sock.close()
    assert_every_worker_clean(svc, time.time())


def test_ready_and_metrics_show_the_pool(svc, client: openai.OpenAI) -> None:
    client.completions.create(model="smollm2", prompt="Hello", max_tokens=4)
    with urllib.request.urlopen(svc.http_url + "/ready", timeout=10) as res:
        assert json.loads(res.read())["status"] == "ready"
    with urllib.request.urlopen(svc.http_url + "/metrics", timeout=10) as res:
        text = res.read().decode()
    workers = list_workers(connect(svc.redis_url))
    assert {w.role for w in workers} == {"prefill", "decode"}
    for w in workers:
        assert f'tandem_worker_admitted{{role="{w.role}",worker_id="{w.worker_id}"}}' in text
    decode = next(w for w in workers if w.role == "decode")
    assert (f'tandem_worker_kv_blocks_total{{role="decode",worker_id="{decode.worker_id}"}} '
            f"{float(decode.total_blocks)}") in text  # fmt: skip
    assert 'tandem_requests_total{api="http",finish_reason="length"}' in text
    assert "tandem_time_to_first_token_seconds_count" in text
