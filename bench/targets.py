"""
What the benchmark measures: the mock upstream reached directly, nginx as the
reference reverse proxy, llmproxy (1 worker, ``--workers 2``, the Redis cache,
optionally under PyPy) and LiteLLM in its own venv; each one's generated
config, command line, CPU pinning and readiness check.

llmproxy's config has every feature of the hot path on: a client key (checked
on every request), a model routed round robin over two upstream names (both the
mock), Prometheus metrics (always on), the JSON access log to a file, and the
memory cache.  The load generator puts a counter in every prompt, so every
request is a cache lookup that misses (and then a store); the cache-hit cells
send one prompt again and again.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.procs import Child, cpu_seconds, free_port, wait_until
from bench.upstream import IDLE_MODEL, MODEL, nginx_common, nginx_temp_paths

CLIENT_KEY = "sk-bench-client"
ADMIN_KEY = "sk-bench-admin"
UPSTREAM_KEY = "sk-bench-upstream"
LITELLM = Path("/tmp/litellm-venv/bin/litellm")


@dataclass
class Target:
    """One thing the load generator talks to."""

    name: str
    kind: str  # direct | nginx | llmproxy | litellm
    port: int
    child: Child | None = None
    #: Headers every request carries (the client key).
    headers: dict[str, str] = field(default_factory=dict)
    #: The answer header that tells a cache hit (llmproxy only).
    cache_header: bool = False
    notes: str = ""

    def cpu(self) -> float:
        return self.child.cpu() if self.child is not None else 0.0

    def cpu_by_process(self) -> dict[int, float]:
        """CPU seconds so far of each process of the target (a --workers parent and workers)."""
        if self.child is None:
            return {}
        return {pid: cpu_seconds([pid]) for pid in self.child.tree()}

    def rss_kib(self) -> int:
        return self.child.rss_kib() if self.child is not None else 0

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()


def post(
    port: int, path: str, body: dict[str, Any], headers: dict[str, str], timeout: float = 30
) -> tuple[int, dict[str, str], bytes]:
    """One blocking request (checks and readiness, not load)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(
            "POST", path, json.dumps(body), {"Content-Type": "application/json", **headers}
        )
        response = conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        conn.close()


def get(port: int, path: str, headers: dict[str, str], timeout: float = 10) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _ready(target: Target) -> bool:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "ready?"}]}
    status, _, _ = post(target.port, "/v1/chat/completions", body, target.headers, timeout=5)
    return status == 200


def wait_ready(target: Target, timeout: float) -> Target:
    assert target.child is not None
    wait_until(lambda: _ready(target), timeout, target.name, target.child)
    return target


# -- nginx, the reference reverse proxy -------------------------------------------------


def nginx_proxy(workdir: Path, mock_port: int, cpus: str | None) -> Target:
    port = free_port()
    name = "nginx-proxy"
    conf = workdir / f"{name}.conf"
    conf.write_text(
        nginx_common(workdir, name)
        + "http {\n"
        + nginx_temp_paths(workdir, name)
        + f"    access_log {workdir}/{name}.access.log combined buffer=64k;\n"
        "    keepalive_requests 10000000;\n    keepalive_timeout 600s;\n"
        f"    upstream mock {{\n        server 127.0.0.1:{mock_port};\n"
        "        keepalive 512;\n        keepalive_requests 10000000;\n    }\n"
        f"    server {{\n        listen 127.0.0.1:{port} backlog=4096;\n"
        "        location / {\n            proxy_pass http://mock;\n"
        "            proxy_http_version 1.1;\n"
        '            proxy_set_header Connection "";\n'
        "            proxy_buffering off;\n"
        "            proxy_read_timeout 900s;\n        }\n    }\n}\n"
    )
    child = Child(
        name,
        ["nginx", "-p", str(workdir), "-c", str(conf), "-e", "stderr"],
        workdir / f"{name}.log",
        cpus=cpus,
    )
    target = Target("nginx", "nginx", port, child, notes="nginx 1 worker, proxy_buffering off")
    return wait_ready(target, 15)


# -- llmproxy ---------------------------------------------------------------------------


def llmproxy_config(
    workdir: Path, name: str, mock_port: int, redis_url: str | None = None
) -> dict[str, Any]:
    upstream = {
        "base_url": f"http://127.0.0.1:{mock_port}/v1",
        "api_key": UPSTREAM_KEY,
        "max_connections": 2048,
    }
    # Small, so that the misses' stores (evicted LRU) do not swell the RSS of the idle cell.
    cache: dict[str, Any] = {"backend": "memory", "max_bytes": 16 * 2**20, "ttl": 3600}
    config: dict[str, Any] = {
        "server": {"drain_seconds": 1},
        "upstreams": {"mock-a": upstream, "mock-b": dict(upstream)},
        "models": {
            MODEL: {
                "strategy": "round_robin",
                "targets": [{"upstream": "mock-a"}, {"upstream": "mock-b"}],
            },
            IDLE_MODEL: {"targets": [{"upstream": "mock-a"}]},
        },
        "routing": {"retries": 1},
        "cache": cache,
        "auth": {"keys": [{"name": "bench", "key": CLIENT_KEY}], "admin_keys": [ADMIN_KEY]},
        "access_log": {"path": str(workdir / f"{name}.access.log"), "format": "json"},
    }
    if redis_url is not None:
        config["redis"] = {"url": redis_url}
        cache["backend"] = "redis"
    return config


def llmproxy(
    workdir: Path,
    name: str,
    mock_port: int,
    cpus: str | None,
    workers: int = 1,
    redis_url: str | None = None,
    python: str | None = None,
    env: dict[str, str] | None = None,
) -> Target:
    """
    ``twistd -n llmproxy`` from this interpreter's venv (or ``python``: PyPy),
    in ``env`` (``bench ab``: another build first on ``PYTHONPATH``).
    """
    port = free_port()
    config = workdir / f"{name}.yaml"
    config.write_text(yaml.safe_dump(llmproxy_config(workdir, name, mock_port, redis_url)))
    if python is None:
        twistd = [str(Path(sys.executable).parent / "twistd")]
    else:
        # llmproxy and its twistd dropin from this checkout; its dependencies from PyPy's own.
        twistd = [python, "-c", "from twisted.scripts.twistd import run; run()"]
        checkout = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=checkout)
    args = [*twistd, "--pidfile=", "-n", "llmproxy", "--config", str(config)]
    args += ["--listen", f"tcp:{port}:interface=127.0.0.1:backlog=4096"]
    if workers != 1:
        args += ["--workers", str(workers)]
    child = Child(name, args, workdir / f"{name}.log", cpus=cpus, env=env, cwd=workdir)
    features = "keys, routing over 2 upstreams, metrics, JSON access log"
    cache = "Redis cache" if redis_url else "memory cache"
    target = Target(
        name,
        "llmproxy",
        port,
        child,
        headers={"Authorization": f"Bearer {CLIENT_KEY}"},
        cache_header=True,
        notes=f"{workers} worker(s); {features}, {cache}",
    )
    return wait_ready(target, 60)


def check_llmproxy(target: Target) -> None:
    """
    A new prompt misses and the same prompt again hits (with ``--workers`` the
    memory cache is per worker: a few tries); /metrics answers.
    """
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"check {os.getpid()}"}]}
    seen = []
    for _ in range(10):
        status, headers, data = post(target.port, "/v1/chat/completions", body, target.headers)
        seen.append(headers.get("x-llmproxy-cache"))
        if status != 200:
            raise RuntimeError(f"{target.name}: HTTP {status}: {data[:300]!r}")
        if seen[-1] == "hit":
            break
    if seen[0] != "miss" or seen[-1] != "hit":
        raise RuntimeError(f"{target.name}: expected a miss then a hit, got {seen}")
    status, metrics = get(target.port, "/metrics", {"Authorization": f"Bearer {ADMIN_KEY}"})
    if status != 200 or b"llmproxy" not in metrics:
        raise RuntimeError(f"{target.name}: /metrics answered {status}")


# -- LiteLLM ----------------------------------------------------------------------------


def litellm_available(path: Path = LITELLM) -> bool:
    return path.exists()


def litellm(workdir: Path, mock_port: int, cpus: str | None, path: Path = LITELLM) -> Target:
    port = free_port()

    def entry(model: str) -> dict[str, Any]:
        return {
            "model_name": model,
            "litellm_params": {
                "model": f"openai/{model}",
                "api_base": f"http://127.0.0.1:{mock_port}/v1",
                "api_key": UPSTREAM_KEY,
            },
        }

    config = {
        "model_list": [entry(MODEL), entry(IDLE_MODEL)],
        "general_settings": {"master_key": CLIENT_KEY},
        "litellm_settings": {"drop_params": True},
    }
    config_path = workdir / "litellm.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = dict(
        os.environ,
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_LOG="ERROR",
        LITELLM_TELEMETRY="False",
        DISABLE_ADMIN_UI="True",
        NO_DOCS="True",
    )
    env.pop("DATABASE_URL", None)
    args = [str(path), "--config", str(config_path), "--host", "127.0.0.1"]
    args += ["--port", str(port), "--num_workers", "1"]
    child = Child("litellm", args, workdir / "litellm.log", cpus=cpus, env=env, cwd=workdir)
    target = Target(
        "litellm",
        "litellm",
        port,
        child,
        headers={"Authorization": f"Bearer {CLIENT_KEY}"},
        notes="1 worker, master key, no database",
    )
    return wait_ready(target, 180)


def litellm_version(path: Path = LITELLM) -> str | None:
    """The installed LiteLLM version, from its venv's metadata."""
    site = path.parent.parent / "lib"
    for found in site.glob("python*/site-packages/litellm-*.dist-info"):
        return found.name.removeprefix("litellm-").removesuffix(".dist-info")
    return None
