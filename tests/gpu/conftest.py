"""What the GPU tests share: a tiny Llama and Qwen3 checkpoint with transformers' model
on the GPU beside it, each built once per module."""

import pytest

from tests.engine.conftest import make_tiny_checkpoint

# head_dim 64 like real models; GQA 4:1.
SHAPE = dict(
    hidden_size=512,
    intermediate_size=1024,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=2048,
    num_hidden_layers=3,
)


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_tiny_checkpoint(path, request.param, **SHAPE)
    return path, hf.cuda().eval()
