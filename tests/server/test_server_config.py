"""Settings: flags beat environment beat config file beat defaults; errors name the key and value."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import ModelSettings, is_loopback, load_settings
from server.errors import ConfigError


@pytest.fixture(autouse=True)
def no_llamasplit_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in [k for k in os.environ if k.startswith("LLAMASPLIT_")]:
        monkeypatch.delenv(key)


TOML = """
host = "127.0.0.1"
port = 9001
ctx = 4096
parallel = 2
max_queue = 5

[[models]]
path = "a.gguf"
alias = "alpha"
ctx = 8192
cache_type_k = "q8_0"
tensor_split = [3, 1]

[models.sampling]
temperature = 0.2
"""

YAML = """
port: 9002
api_keys: [from-file]
models:
  - path: b.gguf
    alias: beta
    parallel: 4
    split_mode: row
"""


def test_defaults_bind_loopback_without_key() -> None:
    settings = load_settings()
    assert settings.host == "127.0.0.1" and settings.port == 8000
    assert settings.api_keys == ()
    assert settings.models == ()


def test_toml_config_file_sets_per_model_options(tmp_path: Path) -> None:
    config = tmp_path / "llamasplit.toml"
    config.write_text(TOML)
    settings = load_settings({"config": config})
    assert settings.port == 9001 and settings.max_queue == 5
    (model,) = settings.models
    # Relative model paths are relative to the config file.
    assert model.path == tmp_path / "a.gguf" and model.alias == "alpha"
    options = settings.model_options(model)
    assert options.ctx == 8192  # the model's own value
    assert options.parallel == 2  # inherited from the top level
    assert options.cache_type_k == "q8_0"
    assert options.tensor_split == (3.0, 1.0)
    assert model.sampling is not None and model.sampling.temperature == 0.2


def test_yaml_config_file_is_read_and_keys_stay_secret(tmp_path: Path) -> None:
    config = tmp_path / "llamasplit.yaml"
    config.write_text(YAML)
    settings = load_settings({"config": config})
    assert settings.port == 9002
    assert settings.models[0].split_mode == "row" and settings.models[0].parallel == 4
    assert [k.get_secret_value() for k in settings.api_keys] == ["from-file"]
    assert "from-file" not in repr(settings) and "from-file" not in str(settings.model_dump())


def test_flags_beat_environment_beat_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.toml"
    config.write_text("port = 1111\nctx = 1024\nthreads = 3\n")
    monkeypatch.setenv("LLAMASPLIT_CONFIG", str(config))
    monkeypatch.setenv("LLAMASPLIT_PORT", "2222")
    monkeypatch.setenv("LLAMASPLIT_CTX", "2048")
    settings = load_settings({"port": 3333})
    assert settings.port == 3333  # flag
    assert settings.ctx == 2048  # environment over file
    assert settings.threads == 3  # file over default


def test_environment_lists_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMASPLIT_API_KEYS", "k1,k2")
    monkeypatch.setenv("LLAMASPLIT_TENSOR_SPLIT", "3,1")
    monkeypatch.setenv("LLAMASPLIT_RPC", "10.0.0.2:50052,10.0.0.3:50052")
    settings = load_settings()
    assert [k.get_secret_value() for k in settings.api_keys] == ["k1", "k2"]
    assert settings.tensor_split == (3.0, 1.0)
    assert settings.rpc == ("10.0.0.2:50052", "10.0.0.3:50052")


def test_non_loopback_bind_without_key_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"0\.0\.0\.0.*not a loopback.*API key.*--insecure"):
        load_settings({"host": "0.0.0.0"})


@pytest.mark.parametrize("extra", [{"api_keys": ("secret",)}, {"insecure": True}], ids=["with-key", "insecure"])
def test_non_loopback_bind_with_key_or_insecure_is_allowed(extra: dict[str, object]) -> None:
    assert load_settings({"host": "0.0.0.0", **extra}).host == "0.0.0.0"


@pytest.mark.parametrize(
    ("cli", "message"),
    [
        ({"ctx": 0}, "ctx=0: Input should be greater than or equal to 1"),
        ({"cache_type_k": "q9_9"}, "cache_type_k='q9_9': 'q9_9' is not a KV cache type"),
        ({"tensor_split": "3,x"}, "tensor_split='3,x'"),
        ({"tensor_split": "0,0"}, "positive sum"),
        ({"port": 70000}, "port=70000"),
        ({"rpc": "nohost"}, "'nohost' is not host:port"),
        ({"flash_attn": "maybe"}, "flash_attn='maybe'"),
        ({"bogus_setting": 1}, "bogus_setting: unknown setting"),
    ],
    ids=["ctx-zero", "cache-type", "split-text", "split-zero", "port", "rpc", "flash-attn", "unknown-key"],
)
def test_invalid_settings_name_the_key_and_value(cli: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(cli)
    assert message in str(info.value)


def test_bad_api_key_is_reported_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"api_keys": (" padded-secret ",)})
    assert "padded-secret" not in str(info.value)
    assert "API key #1" in str(info.value)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.toml", "port = = 1", "is not valid TOML"),
        ("bad.yaml", "port: [1", "is not valid YAML"),
        ("list.yaml", "- 1\n- 2", "must hold a table of settings"),
        ("conf.json", "{}", "must end in .toml, .yaml or .yml"),
    ],
    ids=["toml-syntax", "yaml-syntax", "yaml-not-a-table", "wrong-suffix"],
)
def test_unreadable_config_files_fail_clearly(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings({"config": path})


def test_missing_config_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config file .*nope\.toml"):
        load_settings({"config": tmp_path / "nope.toml"})


def test_two_models_with_one_alias_are_refused() -> None:
    models = [{"path": "a.gguf", "alias": "same"}, {"path": "b.gguf", "alias": "same"}]
    with pytest.raises(ConfigError, match="several models are named same"):
        load_settings({"models": models})


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(ValueError):
        settings.port = 1  # type: ignore[misc]
    with pytest.raises(ValueError):
        ModelSettings(path=Path("x.gguf")).ctx = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.5.5.5", True), ("::1", True), ("localhost", True), ("0.0.0.0", False),
     ("192.168.1.2", False), ("example.com", False), ("::", False)],
)  # fmt: skip
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_environment_sets_models_nested_sampling_and_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMASPLIT_MODELS", '[{"path": "a.gguf", "alias": "x", "ctx": 100}]')
    monkeypatch.setenv("LLAMASPLIT_SAMPLING__TEMPERATURE", "0.3")
    monkeypatch.setenv("LLAMASPLIT_REPACK", "false")
    monkeypatch.setenv("LLAMASPLIT_QUEUE_FULL_STATUS", "503")
    settings = load_settings()
    assert settings.models[0].alias == "x" and settings.models[0].ctx == 100
    assert settings.sampling.temperature == 0.3 and settings.sampling.top_k == 40
    assert settings.repack is False and settings.queue_full_status == 503
    monkeypatch.setenv("LLAMASPLIT_QUEUE_FULL_STATUS", "500")
    with pytest.raises(ConfigError, match="queue_full_status='500': must be 429"):
        load_settings()


def test_batch_size_alone_brings_the_physical_batch_down_with_it() -> None:
    from server.registry import plan_request

    settings = load_settings({"batch_size": 32})
    assert plan_request(settings, settings).n_ubatch == 32  # llama-server's meaning of -b 32
    settings = load_settings({"batch_size": 2048})
    assert plan_request(settings, settings).n_ubatch == 512


def test_memory_limits_and_model_lists_are_read_from_text(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMASPLIT_DEVICE_LIMIT", "0=20GiB, 1=512MiB")
    monkeypatch.setenv("LLAMASPLIT_PIN", "a,b")
    models = [{"path": "a.gguf", "alias": "a"}, {"path": "b.gguf", "alias": "b"}]
    settings = load_settings({"host_limit": "8GiB", "models": models})
    assert settings.device_limit == {0: 20 << 30, 1: 512 << 20}
    assert settings.host_limit == 8 << 30 and settings.pin == ("a", "b")
    with pytest.raises(ConfigError, match="preload names c"):
        load_settings({"preload": "c", "models": [{"path": "a.gguf", "alias": "a"}]})
    with pytest.raises(ConfigError, match="is not DEVICE=SIZE"):
        load_settings({"device_limit": "20GiB"})
