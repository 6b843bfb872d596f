import pytest

from tandem.engine.checkpoint_resolver import resolve_model, shipped_config_names
from tandem.engine.model_config import ModelConfig
from tandem.engine.models import build_model
from tests.engine.conftest import FAMILIES


@pytest.mark.parametrize(
    ("name", "billions"),
    [
        ("llama-3.1-8b", 8.03),
        ("qwen3-0.6b", 0.596),
        ("qwen2.5-7b", 7.62),
        ("mistral-7b", 7.25),
    ],
)
def test_shipped_configs_have_the_published_sizes(name, billions):
    assert name in shipped_config_names()
    cfg = ModelConfig.from_dir(resolve_model(name), name)
    assert cfg.num_parameters() / 1e9 == pytest.approx(billions, rel=0.01)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_parameter_count_formula_matches_the_module(tiny_checkpoints, family):
    path, _ = tiny_checkpoints[family]
    cfg = ModelConfig.from_dir(path)
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters()


def test_llama31_rope_scaling_is_parsed():
    cfg = ModelConfig.from_dir(resolve_model("llama-3.1-8b"))
    assert cfg.rope_scaling["factor"] == 8.0 and cfg.rope_theta == 500000.0
    assert cfg.eos_token_ids == {128001, 128008, 128009}


def test_unknown_model_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="smollm2"):
        resolve_model("no-such-model")


@pytest.mark.parametrize("name", ["qwen3-0.6b", "llama-3.1-8b"])
def test_shipped_config_gets_a_placeholder_tokenizer_of_its_vocab(tmp_path, name):
    from tandem.core.tokenizer import Tokenizer

    model_dir = resolve_model(name, tmp_path)
    cfg = ModelConfig.from_dir(model_dir, name)
    tok = Tokenizer(model_dir)
    assert tok.vocab_size == cfg.vocab_size
    last = cfg.vocab_size - 1
    assert tok.encode(f"<7> <{last}>", add_special_tokens=False) == [7, last]
    assert tok.decode([7, last]) == f"<7> <{last}>"
    assert resolve_model(name, tmp_path) == model_dir  # idempotent, file kept
