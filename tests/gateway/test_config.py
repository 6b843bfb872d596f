"""Gateway settings: flags map onto a validated config; the model's limits come from disk."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from tandem.core.model_paths import default_cache_dir
from tandem.core.request_checks import ModelLimits
from tandem.gateway.config import GatewayConfig, load_model_limits
from tandem.gateway.main import add_arguments, config_from_args


def parse(*argv: str) -> GatewayConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_flags_build_a_config(model_dir: Path) -> None:
    cfg = parse(
        "--model-dir", str(model_dir), "--redis-url", "redis://r:6380/1",
        "--grpc-host", "0.0.0.0", "--grpc-port", "6000", "--gateway-id", "gw-1",
        "--request-timeout", "30", "--max-model-len", "2048", "--stream-write-timeout", "7.5",
    )  # fmt: skip
    assert (cfg.model, cfg.model_dir, cfg.redis_url) == ("smollm2", model_dir, "redis://r:6380/1")
    assert (cfg.grpc_address, cfg.gateway_id, cfg.request_timeout_s) == ("0.0.0.0:6000", "gw-1", 30)
    assert cfg.stream_write_timeout_s == 7.5
    assert load_model_limits(cfg, 49152) == ModelLimits(max_model_len=2048, vocab_size=49152)


def test_defaults_are_loopback_and_the_model_cache(model_dir: Path) -> None:
    cfg = parse("--model-dir", str(model_dir))
    assert cfg.grpc_address == "127.0.0.1:50051"
    assert (
        len(cfg.gateway_id) == 12
        and cfg.gateway_id != parse("--model-dir", str(model_dir)).gateway_id
    )
    assert load_model_limits(cfg, 49152) == ModelLimits(max_model_len=8192, vocab_size=49152)
    if (default_cache_dir() / "smollm2" / "tokenizer.json").exists():
        assert parse().model_dir == default_cache_dir() / "smollm2"


def test_a_directory_as_model_names_it_by_its_basename(model_dir: Path) -> None:
    cfg = parse("--model", str(model_dir))
    assert (cfg.model, cfg.model_dir) == (model_dir.name, model_dir)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model": ""}, "model name must not be empty"),
        ({"model_dir": "/nonexistent"}, "no tokenizer.json"),
        ({"redis_url": "http://x"}, "redis_url must be"),
        ({"grpc_port": 70000}, "grpc_port"),
        ({"gateway_id": "a b"}, "gateway_id"),
        ({"request_timeout_s": 0}, "request_timeout_s must be > 0"),
        ({"stream_write_timeout_s": 0}, "stream_write_timeout_s must be > 0"),
        ({"max_prompt_bytes": 8 * 1024 * 1024}, "cannot exceed max_receive_message_bytes"),
    ],
)
def test_bad_settings_are_refused(model_dir: Path, overrides: dict, message: str) -> None:
    fields = {"model": "smollm2", "model_dir": model_dir, **overrides}
    with pytest.raises(ValueError, match=message):
        GatewayConfig(**fields)


def test_max_model_len_cannot_exceed_the_model(model_dir: Path) -> None:
    cfg = GatewayConfig(model="smollm2", model_dir=model_dir, max_model_len=9000)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings 8192"):
        load_model_limits(cfg, 49152)
