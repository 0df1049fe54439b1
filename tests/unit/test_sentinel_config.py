"""``redis.sentinel``: the config that finds Redis through Sentinel, and its path-named errors."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from llmproxy.config import Redis, Sentinel, parse_yaml
from tests.unit.test_config import MINIMAL, error_of

ENV = {"OPENAI_API_KEY": "k"}


def redis_of(section: str) -> Redis:
    config = parse_yaml(MINIMAL + section, "test.yaml", ENV)
    assert config.redis is not None
    return config.redis


class SentinelConfigTests(SynchronousTestCase):
    def test_sentinel_names_the_master_and_where_to_ask(self) -> None:
        config = parse_yaml(
            MINIMAL
            + "redis:\n"
            + "  timeout: 0.5\n"
            + "  sentinel:\n"
            + "    master: cache\n"
            + "    addresses: ['10.0.0.1:26379', ' sentinel-b:26380', '[::1]:26381']\n"
            + "    db: 2\n"
            + "    password: ${REDIS_PASSWORD}\n",
            "test.yaml",
            {**ENV, "REDIS_PASSWORD": "s3cret"},
        )
        assert config.redis is not None
        assert config.redis.url is None and config.redis.timeout == 0.5
        assert config.redis.sentinel == Sentinel(
            master="cache",
            addresses=(("10.0.0.1", 26379), ("sentinel-b", 26380), ("::1", 26381)),
            db=2,
            password="s3cret",
        )
        assert "s3cret" not in repr(config.redis)

    def test_db_and_password_are_optional(self) -> None:
        redis = redis_of("redis: {sentinel: {master: m, addresses: [127.0.0.1:26379]}}\n")
        assert redis.sentinel == Sentinel("m", (("127.0.0.1", 26379),))
        assert redis.sentinel.db is None and redis.sentinel.password is None
        assert redis.timeout == 0.25

    def test_a_url_still_works_as_before(self) -> None:
        assert redis_of("redis: {url: 'redis://10.0.0.9:6380/3'}\n") == Redis(
            url="redis://10.0.0.9:6380/3"
        )
        assert redis_of("redis: {}\n") == Redis()
        assert Redis().url == "redis://127.0.0.1:6379/0" and Redis().sentinel is None

    def test_url_and_sentinel_are_alternatives(self) -> None:
        assert error_of(
            MINIMAL + "redis: {url: 'redis://x', sentinel: {master: m, addresses: ['h:1']}}\n"
        ) == ("redis: url and sentinel are alternatives: give one of them")
        with self.assertRaises(ValueError):
            Redis(url=None)
        with self.assertRaises(ValueError):
            Redis(url="redis://x", sentinel=Sentinel("m", (("h", 1),)))

    def test_a_cache_in_redis_may_find_it_through_sentinel(self) -> None:
        config = parse_yaml(
            MINIMAL
            + "cache: {backend: redis}\n"
            + "redis: {sentinel: {master: m, addresses: ['h:26379']}}\n",
            "test.yaml",
            ENV,
        )
        assert config.cache.backend == "redis" and config.redis is not None

    def test_errors_name_the_path(self) -> None:
        def sentinel_error(body: str) -> str:
            return error_of(MINIMAL + f"redis:\n  sentinel: {body}\n")

        path = "redis.sentinel"
        cases = {
            "{addresses: ['h:1']}": f"{path}.master: is required",
            "{master: '  ', addresses: ['h:1']}": f"{path}.master: must not be empty",
            "{master: m}": f"{path}.addresses: is required",
            "{master: m, addresses: []}": f"{path}.addresses: needs at least one host:port",
            "{master: m, addresses: 'h:1'}": f"{path}.addresses: expected a list, got a string",
            "{master: m, addresses: ['h:1', x]}": (
                f"{path}.addresses[1]: expected host:port, got 'x'"
            ),
            "{master: m, addresses: [{h: 1}]}": (
                f"{path}.addresses[0]: expected a string, got a mapping"
            ),
            "{master: m, addresses: ['h:1', 'h:1']}": (
                f"{path}.addresses[1]: duplicate address 'h:1'"
            ),
            "{master: m, addresses: ['h:1'], db: -1}": f"{path}.db: must be >= 0, got -1",
            "{master: m, addresses: ['h:1'], dbid: 1}": (
                f"{path}.dbid: unknown key (did you mean 'db'?)"
            ),
            "{master: m, adresses: ['h:1']}": (
                f"{path}.adresses: unknown key (did you mean 'addresses'?)"
            ),
            "[h:1]": f"{path}: expected a mapping, got a list",
        }
        for body, message in cases.items():
            assert sentinel_error(body) == message, body

    def test_an_address_is_host_colon_port(self) -> None:
        # No port, no host, a port out of range or not a number, IPv6 without brackets.
        for bad in ("h", "h:", ":26379", "h:0", "h:65536", "h:port", "h:²", "::1:26379"):
            assert error_of(
                MINIMAL + f"redis: {{sentinel: {{master: m, addresses: ['{bad}']}}}}\n"
            ) == (f"redis.sentinel.addresses[0]: expected host:port, got '{bad}'"), bad

    def test_an_unknown_redis_key_suggests_sentinel(self) -> None:
        assert error_of(MINIMAL + "redis: {sentinels: {master: m}}\n") == (
            "redis.sentinels: unknown key (did you mean 'sentinel'?)"
        )
