"""Configuration: schema, environment expansion, path-named errors, lookup order."""

from __future__ import annotations

import tempfile
from contextlib import chdir
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from llmproxy.config import ConfigError, find_config, load_config, parse_yaml

ROOT = Path(__file__).resolve().parents[2]

MINIMAL = """
upstreams:
  openai:
    base_url: https://api.openai.com/v1/
    api_key: ${OPENAI_API_KEY}
  local:
    base_url: http://127.0.0.1:8001/v1
models:
  gpt-4o:
    targets:
      - upstream: openai
      - upstream: local
        model: Qwen/Qwen2.5-7B-Instruct
        weight: 0
"""


def error_of(text: str, environ: dict[str, str] | None = None) -> str:
    """The message of the ConfigError that ``text`` raises."""
    try:
        parse_yaml(text, "test.yaml", environ if environ is not None else {"OPENAI_API_KEY": "k"})
    except ConfigError as e:
        return str(e)
    raise AssertionError("the config was accepted")


class SchemaTests(SynchronousTestCase):
    def test_minimal_config_loads_with_defaults(self) -> None:
        config = parse_yaml(MINIMAL, "test.yaml", {"OPENAI_API_KEY": "sk-1"})
        assert config.upstreams["openai"].api_key == "sk-1"
        assert config.upstreams["openai"].base_url == "https://api.openai.com/v1"
        assert config.upstreams["local"].api_key is None
        assert config.upstreams["local"].timeouts.first_byte == 120
        targets = config.models["gpt-4o"].targets
        assert [(t.upstream, t.model, t.weight) for t in targets] == [
            ("openai", "gpt-4o", 1),
            ("local", "Qwen/Qwen2.5-7B-Instruct", 0),
        ]
        assert config.listen == ("tcp:8080:interface=127.0.0.1",)
        assert config.routing.retry_on == frozenset(
            {"connect", "timeout", 429, 500, 502, 503, 504, 529}
        )
        assert config.cache.backend == "memory" and config.cache.scope == "key"
        assert config.redis is None and config.auth.keys == ()

    def test_config_objects_are_frozen(self) -> None:
        config = parse_yaml(MINIMAL, "t", {"OPENAI_API_KEY": "k"})
        with self.assertRaises(AttributeError):
            config.cache.ttl = 5  # type: ignore[misc]

    def test_bare_off_means_off(self) -> None:
        assert parse_yaml("cache: {backend: off}\n", "t", {}).cache.backend == "off"

    def test_unknown_keys_are_errors_with_a_hint(self) -> None:
        assert error_of("cache: {backnd: memory}\n") == (
            "cache.backnd: unknown key (did you mean 'backend'?)"
        )
        assert error_of("routng: {}\n") == "routng: unknown key (did you mean 'routing'?)"
        bad_target = MINIMAL.replace("weight: 0", "weight: 0\n        wieght: 1")
        assert error_of(bad_target) == (
            "models.gpt-4o.targets[1].wieght: unknown key (did you mean 'weight'?)"
        )

    def test_errors_name_their_path(self) -> None:
        assert error_of(MINIMAL.replace("upstream: local", "upstream: azure")) == (
            "models.gpt-4o.targets[1].upstream: no upstream named 'azure'"
        )
        assert (
            error_of(MINIMAL + "routing: {retries: -1}\n")
            == "routing.retries: must be >= 0, got -1"
        )
        assert error_of(MINIMAL + "routing: {retry_on: [connect, 200]}\n") == (
            "routing.retry_on[1]: expected connect, timeout, reset "
            "or an HTTP status 400-599, got '200'"
        )
        assert "models.gpt-4o.strategy: must be one of" in error_of(
            MINIMAL.replace("  gpt-4o:\n", "  gpt-4o:\n    strategy: fastest\n")
        )
        assert error_of(MINIMAL.replace("https://api.openai.com/v1/", "ftp://x")) == (
            "upstreams.openai.base_url: expected an http(s) URL, got 'ftp://x'"
        )
        assert error_of(MINIMAL + "cache: {backend: redis}\n") == (
            "cache.backend: redis needs a top-level redis section"
        )
        timeouts = MINIMAL.replace(
            "base_url: http://127.0.0.1:8001/v1", "base_url: http://x/v1\n    timeouts: {idle: 0}"
        )
        assert error_of(timeouts) == "upstreams.local.timeouts.idle: must be > 0, got 0"

    def test_the_access_log_flush_defaults_to_a_second_and_may_be_zero(self) -> None:
        def log(extra: str) -> object:
            config = parse_yaml(MINIMAL + extra, "test.yaml", {"OPENAI_API_KEY": "k"})
            assert config.access_log is not None
            return config.access_log.flush

        assert log("access_log: {path: '-'}\n") == 1.0
        assert log("access_log: {path: '-', flush: 0}\n") == 0.0
        assert log("access_log: {path: '-', flush: 0.2}\n") == 0.2
        assert error_of(MINIMAL + "access_log: {path: '-', flush: -1}\n") == (
            "access_log.flush: must be >= 0, got -1"
        )
        for value, shown in ((".nan", "nan"), (".inf", "inf"), ("'nan'", "nan")):
            assert error_of(MINIMAL + f"access_log: {{path: '-', flush: {value}}}\n") == (
                f"access_log.flush: expected a finite number, got {shown}"
            )

    def test_auth_keys_are_validated(self) -> None:
        keys = MINIMAL + "auth:\n  keys:\n    - name: a\n      key: k1\n      models: [gpt-5]\n"
        assert error_of(keys) == "auth.keys[0].models[0]: no model named 'gpt-5'"
        both = MINIMAL + "auth:\n  keys:\n    - {name: a}\n"
        assert error_of(both) == "auth.keys[0]: exactly one of key or key_sha256 is required"
        dup = MINIMAL + "auth:\n  keys:\n    - {name: a, key: x}\n    - {name: a, key: y}\n"
        assert error_of(dup) == "auth.keys[1].name: duplicate key name 'a'"

    def test_invalid_yaml_names_the_file_and_line(self) -> None:
        message = error_of("listen: [unclosed\n")
        assert message.startswith("test.yaml: ") and "line" in message


class EnvironmentTests(SynchronousTestCase):
    def test_env_default_and_missing_variable(self) -> None:
        text = "listen: ${PORT_SPEC:-tcp:9999}\n"
        assert parse_yaml(text, "t", {}).listen == ("tcp:9999",)
        assert parse_yaml(text, "t", {"PORT_SPEC": "tcp:1"}).listen == ("tcp:1",)
        message = error_of(MINIMAL, environ={})
        assert message == "upstreams.openai.api_key: environment variable OPENAI_API_KEY is not set"

    def test_dollar_dollar_is_a_literal_dollar(self) -> None:
        config = parse_yaml("cache: {namespace: 'a$$b'}\n", "t", {})
        assert config.cache.namespace == "a$b"


class LookupTests(SynchronousTestCase):
    def test_shipped_config_runs_with_no_environment(self) -> None:
        config = load_config(str(ROOT / "etc" / "llmproxy.yaml"), environ={})
        assert config.upstreams["default"].base_url == "http://127.0.0.1:8001/v1"
        assert config.upstreams["default"].api_key is None
        assert "gpt-4o-mini" in config.models

    def test_packaged_default_is_the_shipped_config(self) -> None:
        shipped = (ROOT / "etc" / "llmproxy.yaml").read_text()
        assert (ROOT / "llmproxy" / "default.yaml").read_text() == shipped

    def test_lookup_order(self) -> None:
        with tempfile.TemporaryDirectory() as tmp, chdir(tmp):
            assert find_config(None, {}) is None  # nothing here: the packaged default
            assert load_config(None, environ={}).source == "<built-in default>"
            (Path(tmp) / "etc").mkdir()
            (Path(tmp) / "etc" / "llmproxy.yaml").write_text("listen: tcp:1\n")
            assert find_config(None, {}) == "etc/llmproxy.yaml"
            assert find_config(None, {"LLMPROXY_CONFIG": "/x.yaml"}) == "/x.yaml"
            assert find_config("/given.yaml", {"LLMPROXY_CONFIG": "/x.yaml"}) == "/given.yaml"
            with self.assertRaises(ConfigError) as info:
                load_config("/nonexistent.yaml", {})
            assert str(info.exception) == (
                "cannot read config /nonexistent.yaml: No such file or directory"
            )
