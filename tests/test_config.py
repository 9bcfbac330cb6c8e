"""Settings (shared/config.py): declared once with pydantic-settings, checked when loaded, refused at start with
the setting named, printed by `vlsplit config` with secrets masked, and the README's tables written from them."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
from pydantic import ValidationError

from shared import config
from shared.config import ConfigError, DecoderConfig, EncoderConfig, EngineConfig, GatewayConfig, load

REPO = Path(__file__).resolve().parent.parent
VLSPLIT = Path(sys.executable).parent / "vlsplit"
STRONG_KEY = "9f2c4e7a1b3d5f608e2a4c6b8d0f1e3a5c7b9d2f"


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(config.PREFIX)}
    return subprocess.run([str(VLSPLIT), *args], env={**clean, **env}, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name, value, why", [
    ("VLSPLIT_PORT", "abc", "expected a whole number"),
    ("VLSPLIT_MAX_IMAGES", "-1", "must be >= 0"),
    ("VLSPLIT_CACHE_SCOPE", "everyone", "expected one of tenant, global"),
])
def test_a_bad_value_stops_serve_gateway_at_once_naming_the_setting(name, value, why):
    done = _run("serve", "gateway", env={name: value})
    assert done.returncode == 2, done
    assert done.stderr.strip().splitlines() == [f"vlsplit: error: {name}={value}: {why}"], done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_config_command_prints_every_setting_with_its_description_and_masks_secrets():
    env = {"VLSPLIT_PORT": "6001", "VLSPLIT_REDIS_PASSWORD": "hunter2-password", "VLSPLIT_CACHE_HMAC_KEY": STRONG_KEY,
           "VLSPLIT_REDIS_URL": "redis://:url-password@cache:6379/0"}
    done = _run("config", "gateway", env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(GatewayConfig.model_fields)
    assert "VLSPLIT_PORT=6001  # gRPC port; 0 = pick a free one (printed at start)" in lines
    assert "VLSPLIT_REMOTE_IMAGES=false  # fetch https:// image URLs (public addresses only, no redirects)" in lines
    assert any(line.startswith("VLSPLIT_REDIS_PASSWORD=**********  # ") for line in lines)
    assert any(line.startswith("VLSPLIT_CACHE_HMAC_KEY=**********  # ") for line in lines)
    assert any(line.startswith("VLSPLIT_REDIS_URL=redis://:**********@cache:6379/0  # ") for line in lines)
    assert any(line.startswith("VLSPLIT_REDIS_USERNAME=  # ") for line in lines)  # unset is empty, not masked
    for secret in ("hunter2-password", STRONG_KEY, "url-password"):
        assert secret not in done.stdout

    values = json.loads(_run("config", "gateway", "--json", env=env).stdout)
    assert values["VLSPLIT_PORT"] == 6001 and values["VLSPLIT_REDIS_PASSWORD"] == "**********"
    assert set(values) == {config.PREFIX + name.upper() for name in GatewayConfig.model_fields}
    every = json.loads(_run("config", "--json", env={}).stdout)
    assert set(every) == {"encoder", "decoder", "gateway"} and every["decoder"]["VLSPLIT_DECODE_ATTENTION"] == "auto"


def test_config_command_refuses_what_serve_would_refuse():
    done = _run("config", "decoder", env={"VLSPLIT_MAX_STEP_TOKENS": "8"})
    assert done.returncode == 2
    assert done.stderr.strip() == ("vlsplit: error: VLSPLIT_MAX_STEP_TOKENS=8 must be >= VLSPLIT_MAX_BATCH=64 "
                                   "(every running sequence decodes one token a step)")


@pytest.mark.parametrize("cls, env, message", [
    (GatewayConfig, {"VLSPLIT_LOG_JSON": "maybe"}, "VLSPLIT_LOG_JSON=maybe: expected true or false"),
    (GatewayConfig, {"VLSPLIT_DEADLINE_S": "0"}, "VLSPLIT_DEADLINE_S=0: must be > 0"),
    (GatewayConfig, {"VLSPLIT_HTTP_PORT": "70000"}, "VLSPLIT_HTTP_PORT=70000: must be <= 65535"),
    (GatewayConfig, {"VLSPLIT_RETRY_ATTEMPTS": "9"}, "VLSPLIT_RETRY_ATTEMPTS=9: must be <= 5"),
    (GatewayConfig, {"VLSPLIT_AUTH_RATE_SCOPE": "cluster"},
     "VLSPLIT_AUTH_RATE_SCOPE=cluster shares rates through Redis: set VLSPLIT_REDIS_URL"),
    (GatewayConfig, {"VLSPLIT_DEFAULT_MAX_NEW_TOKENS": "100", "VLSPLIT_MAX_NEW_TOKENS_LIMIT": "50"},
     "VLSPLIT_DEFAULT_MAX_NEW_TOKENS=100 must be <= VLSPLIT_MAX_NEW_TOKENS_LIMIT=50"),
    (EncoderConfig, {"VLSPLIT_DTYPE": "fp8"}, "VLSPLIT_DTYPE=fp8: expected one of auto, float32, bfloat16, float16"),
    (EncoderConfig, {"VLSPLIT_PAYLOAD_DTYPE": "int4"}, "VLSPLIT_PAYLOAD_DTYPE=int4: expected one of , float32"),
    (EncoderConfig, {"VLSPLIT_IMAGE_TTL_S": "0"}, "VLSPLIT_IMAGE_TTL_S=0: must be >= 1"),
    (EncoderConfig, {"VLSPLIT_ALLOCATOR": "jemalloc"}, "VLSPLIT_ALLOCATOR=jemalloc: expected one of auto, tcmalloc"),
    (DecoderConfig, {"VLSPLIT_QUANTIZE": "int4"}, "VLSPLIT_QUANTIZE=int4: expected one of off, int8"),
    (DecoderConfig, {"VLSPLIT_DECODE_ATTENTION": "flash"}, "VLSPLIT_DECODE_ATTENTION=flash: expected one of auto"),
    (DecoderConfig, {"VLSPLIT_KV_CACHE_BYTES": "1.5e9"}, "VLSPLIT_KV_CACHE_BYTES=1.5e9: expected a whole number"),
])
def test_values_are_checked_when_loaded(cls, env, message):
    with pytest.raises(ConfigError) as info:
        load(cls, environ=env)
    assert str(info.value).startswith(message), str(info.value)


def test_every_error_is_reported_on_one_line():
    with pytest.raises(ConfigError) as info:
        load(GatewayConfig, environ={"VLSPLIT_PORT": "x", "VLSPLIT_MAX_STOP": "-1"})
    assert str(info.value) == "VLSPLIT_PORT=x: expected a whole number; VLSPLIT_MAX_STOP=-1: must be >= 0"


def test_a_weak_hmac_key_is_refused_without_printing_it():
    with pytest.raises(ConfigError, match="placeholder") as info:
        load(EncoderConfig, environ={"VLSPLIT_CACHE_HMAC_KEY": "change-me-to-32-or-more-random-characters"})
    assert str(info.value).startswith("VLSPLIT_CACHE_HMAC_KEY=**********: the key is a placeholder")
    assert "change-me" not in str(info.value)
    assert load(EncoderConfig, environ={"VLSPLIT_CACHE_HMAC_KEY": STRONG_KEY}).cache_hmac_key.get_secret_value() \
        == STRONG_KEY


def test_flags_override_the_environment_and_the_environment_the_defaults():
    env = {"VLSPLIT_PORT": "7000", "VLSPLIT_REDIS_URL": "redis://cache:6379/0", "VLSPLIT_LOG_LEVEL": "debug"}
    loaded = load(GatewayConfig, {"port": 7001, "decoder": None}, environ=env)
    assert (loaded.port, loaded.redis_url, loaded.decoder, loaded.log_level) == (
        7001, "redis://cache:6379/0", "127.0.0.1:50053", "DEBUG")
    with pytest.raises(ConfigError, match=r"^port=-5 \(a command-line flag\): must be >= 0$"):
        load(GatewayConfig, {"port": -5}, environ={})


def test_a_config_built_in_code_reads_no_environment(monkeypatch):
    monkeypatch.setenv("VLSPLIT_MAX_BATCH", "3")
    assert EngineConfig().max_batch == 64 and load(EngineConfig).max_batch == 3
    assert load(EngineConfig, environ={}).max_batch == 64  # a test's dict, not os.environ


def test_configs_are_frozen_and_replace_checks_names():
    engine = EngineConfig()
    with pytest.raises(ValidationError):
        engine.max_batch = 2
    assert config.replace(engine, max_batch=2).max_batch == 2 and engine.max_batch == 64
    with pytest.raises(TypeError, match="max_bach"):
        config.replace(engine, max_bach=2)
    with pytest.raises(ValidationError):
        GatewayConfig(max_imagse=3)  # a typo in code is an error, not a silent default


def test_decoder_down_s_is_still_read_as_replica_down_s_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, "vlsplit.config"):
        assert load(GatewayConfig, environ={"VLSPLIT_DECODER_DOWN_S": "2.5"}).replica_down_s == 2.5
    assert "VLSPLIT_DECODER_DOWN_S is deprecated: use VLSPLIT_REPLICA_DOWN_S" in caplog.text
    assert load(GatewayConfig, environ={"VLSPLIT_DECODER_DOWN_S": "2.5", "VLSPLIT_REPLICA_DOWN_S": "1"}) \
        .replica_down_s == 1
    assert GatewayConfig(replica_down_s=3).replica_down_s == 3
    with pytest.raises(ConfigError, match="^VLSPLIT_DECODER_DOWN_S=-1: must be >= 0$"):
        load(GatewayConfig, environ={"VLSPLIT_DECODER_DOWN_S": "-1"})


def test_a_likely_typo_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING, "vlsplit.config"):
        load(GatewayConfig, environ={"VLSPLIT_MAX_IMGES": "3", "VLSPLIT_TOKEN": "vls_x", "VLSPLIT_SOMETHING": "1"})
    assert caplog.messages == ["VLSPLIT_MAX_IMGES is not a setting (ignored): did you mean VLSPLIT_MAX_IMAGES?"]


def test_every_setting_is_documented():
    for cls in config.SERVICES.values():
        for name, field in cls.model_fields.items():
            assert field.description and len(field.description) > 8, f"{cls.__name__}.{name} has no description"


def test_choices_agree_with_the_code_that_acts_on_them():
    from services import cli
    from services.llm_decoder.paged_kernel import MODES as ATTENTION
    from services.vision_encoder.engine import BACKENDS
    from shared.codec import DTYPES
    from shared.packed_linear import MODES as PACKED
    from shared.quantize import MODES as QUANTIZE

    assert set(get_args(config.Quantize)) == set(QUANTIZE) == set(cli.QUANTIZE)
    assert set(get_args(config.EncoderBackend)) == set(BACKENDS) == set(cli.BACKENDS)
    assert set(get_args(config.DecodeAttention)) == set(ATTENTION)
    assert set(get_args(config.PackedLinear)) == set(PACKED)
    assert set(get_args(config.PayloadDtype)) == {"", *DTYPES}


def test_readme_settings_tables_are_written_from_the_config():
    done = subprocess.run([sys.executable, "scripts/settings_tables.py", "--check"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr  # names the fix: `make settings-docs`
    readme = (REPO / "README.md").read_text()
    for name in ("server", "cache", "model", "encoder", "video", "decoder", "gateway"):
        assert f"<!-- settings:{name}:start -->" in readme
    assert "| `REPLICA_DOWN_S` | 5 |" in readme and "DECODER_DOWN_S`" not in readme.replace("VLSPLIT_DECODER_DOWN_S", "")


def test_stale_tables_are_caught(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import settings_tables
    finally:
        sys.path.remove(str(REPO / "scripts"))
    stale = (REPO / "README.md").read_text().replace("| `PORT` | 0 |", "| `PORT` | 50051 |")
    monkeypatch.setattr(settings_tables, "README", tmp_path / "README.md")
    settings_tables.README.write_text(stale)
    monkeypatch.setattr(sys, "argv", ["settings_tables.py", "--check"])
    assert settings_tables.main() == 1
    monkeypatch.setattr(sys, "argv", ["settings_tables.py"])
    assert settings_tables.main() == 0 and settings_tables.README.read_text() == (REPO / "README.md").read_text()


def test_every_setting_the_readme_names_exists():
    known = {name for cls in config.SERVICES.values() for name in config.env_names(cls)} | config.OTHER_NAMES
    named = set(re.findall(r"VLSPLIT_[A-Z0-9_]*[A-Z0-9]", (REPO / "README.md").read_text()))
    assert named - known == {"VLSPLIT_MAX_IMGES"}  # the typo the Configuration section shows being warned about
