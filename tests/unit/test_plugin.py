"""The twistd dropin: discoverable, lazy, and building the named service tree."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.application.service import IServiceCollection, IServiceMaker
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parents[2]


class PluginTests(SynchronousTestCase):
    def test_plugins_are_discoverable(self) -> None:
        found = {p.tapname: p for p in getPlugins(IServiceMaker)}
        assert "llmproxy" in found and "llmproxy-mock" in found
        assert found["llmproxy"].description

    def test_dropin_is_lazy(self) -> None:
        # Discovery must not install a reactor (it would break `twistd --reactor=...`)
        # nor import the application.
        probe = (
            "import sys; from twisted.plugin import getPlugins;"
            "from twisted.application.service import IServiceMaker;"
            "names = [p.tapname for p in getPlugins(IServiceMaker)];"
            "assert 'llmproxy' in names, names;"
            "print('twisted.internet.reactor' in sys.modules, 'llmproxy.tap' in sys.modules,"
            " 'txredisapi' in sys.modules)"
        )
        done = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=ROOT
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["False", "False", "False"]
        assert not (ROOT / "twisted" / "plugins" / "__init__.py").exists()
        assert not (ROOT / "twisted" / "__init__.py").exists()

    def test_make_service_builds_the_named_tree(self) -> None:
        from llmproxy.tap import Options, makeService

        options = Options()
        options.parseOptions(
            [
                "--config",
                str(ROOT / "etc" / "llmproxy.yaml"),
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "-l",
                "tcp:0",
            ]
        )
        assert options["listen"] == ["tcp:0:interface=127.0.0.1", "tcp:0"]
        service = makeService(options)
        collection = IServiceCollection(service)
        assert {s.name for s in collection} == {"http", "upstreams", "signals"}
        http = collection.getServiceNamed("http")
        assert getattr(http, "listen", None) == ("tcp:0:interface=127.0.0.1", "tcp:0")

    def test_bad_config_is_one_line_naming_the_file(self) -> None:
        from llmproxy.tap import Options

        with tempfile.TemporaryDirectory() as tmp:
            bad = Path(tmp) / "bad.yaml"
            bad.write_text("cache: {ttl: -1}\n")
            # SystemExit with a message: twistd prints it alone, with no usage text.
            with self.assertRaises(SystemExit) as info:
                Options().parseOptions(["--config", str(bad)])
        assert info.exception.code == f"llmproxy: {bad}: cache.ttl: must be > 0, got -1"

    def test_bad_listen_is_one_line_naming_the_file(self) -> None:
        from llmproxy.tap import Options

        shipped = str(ROOT / "etc" / "llmproxy.yaml")
        with self.assertRaises(SystemExit) as info:
            Options().parseOptions(["--config", shipped, "--listen", "bogus:1"])
        assert str(info.exception.code).startswith(
            f"llmproxy: {shipped}: listen: bad endpoint 'bogus:1'"
        )

    def test_a_bad_option_is_still_a_usage_error(self) -> None:
        from llmproxy.tap import Options

        with self.assertRaises(usage.UsageError):
            Options().parseOptions(["--workers", "none"])

    def test_services_stop_one_after_another_newest_first(self) -> None:
        from twisted.application.service import Service
        from twisted.internet.defer import Deferred

        from llmproxy.service import GatewayService

        stopped: list[str] = []
        gates: dict[str, Deferred[None]] = {}

        class Child(Service):
            def stopService(self) -> Deferred[None]:
                super().stopService()
                name = str(self.name)
                stopped.append(name)
                gates[name] = Deferred()
                return gates[name]

        top = GatewayService()
        for name in ("redis", "upstreams", "http"):
            child = Child()
            child.setName(name)
            child.setServiceParent(top)
        top.startService()
        done = top.stopService()
        assert stopped == ["http"]  # redis and the pools wait for the drain
        gates["http"].callback(None)
        assert stopped == ["http", "upstreams"]
        gates["upstreams"].callback(None)
        gates["redis"].callback(None)
        assert stopped == ["http", "upstreams", "redis"] and done.called
