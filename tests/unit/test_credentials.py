"""The API key and the Redis URL can come from a file or the environment, so that `ps`
does not show them; the flag, the file and the variable take precedence in that order."""

from __future__ import annotations

import pytest

from tandem.cli import build_parser
from tandem.core.credentials import API_KEY_ENV, REDIS_URL_ENV
from tandem.engine.checkpoint_resolver import resolve_model
from tandem.gateway.main import config_from_args
from tandem.roles import worker_config_from_args

URL = "redis://:pw-in-url@127.0.0.1:6400/0"


@pytest.fixture(scope="module", autouse=True)
def converted_model():
    """The gateway needs the bundled model's tokenizer on disk; a worker converts it on
    first start, so a run of this module alone converts it here."""
    resolve_model("smollm2")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    monkeypatch.delenv(REDIS_URL_ENV, raising=False)


def gateway(*flags: str):
    return config_from_args(build_parser().parse_args(["gateway", *flags]))


def worker(*flags: str):
    return worker_config_from_args(build_parser().parse_args(["decode", *flags]), "decode")


def test_gateway_secrets_from_the_environment(monkeypatch):
    assert gateway().api_key is None
    assert gateway().redis_url == "redis://127.0.0.1:6379/0"
    monkeypatch.setenv(API_KEY_ENV, "env-key")
    monkeypatch.setenv(REDIS_URL_ENV, URL)
    cfg = gateway()
    assert (cfg.api_key, cfg.redis_url) == ("env-key", URL)
    assert gateway("--api-key", "flag-key").api_key == "flag-key"


def test_gateway_secrets_from_files(tmp_path, monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "env-key")
    (tmp_path / "key").write_text("file-key\n")
    (tmp_path / "url").write_text(URL + "\n")
    cfg = gateway(
        "--api-key-file", str(tmp_path / "key"), "--redis-url-file", str(tmp_path / "url")
    )
    assert (cfg.api_key, cfg.redis_url) == ("file-key", URL)


def test_worker_redis_url_from_the_environment_or_a_file(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=REDIS_URL_ENV):
        worker()
    monkeypatch.setenv(REDIS_URL_ENV, URL)
    assert worker().redis_url == URL
    (tmp_path / "url").write_text("redis://127.0.0.1:6401/0")
    assert worker("--redis-url-file", str(tmp_path / "url")).redis_url == "redis://127.0.0.1:6401/0"


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--api-key", "k", "--api-key-file", "{dir}/key"], "not both"),
        (["--api-key-file", "{dir}/empty"], "empty"),
        (["--api-key-file", "{dir}/missing"], "No such file"),
    ],
)
def test_bad_secret_flags_are_refused(tmp_path, flags, message):
    (tmp_path / "key").write_text("k")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match=message):
        gateway(*[f.format(dir=tmp_path) for f in flags])
