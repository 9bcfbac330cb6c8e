"""Real processes for service tests: redis-server and `vlsplit serve ...`, on free ports.

Readiness is awaited through events, never sleeps: redis-server's "Ready to accept connections"
log line, and the gRPC health service's Watch stream reaching SERVING.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.launcher import free_port, start_redis, wait_serving

READY_TIMEOUT_S = 120


class Redis:
    def __init__(self, port: int | None = None, *options: str):
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not on PATH: install it (Debian: apt-get install redis-server)")
        self.options = options
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Redis":
        self.proc = start_redis(self.port, *self.options)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


class Service:
    """`python -m vlsplit.cli serve KIND ...` in its own process, waited on until SERVING.
    `command` replaces `python -m vlsplit.cli` (e.g. another venv's `vlsplit`), run in `cwd`."""

    def __init__(self, kind: str, *args: str, port: int | None = None, env: dict | None = None,
                 log_dir: Path | None = None, command: list[str] | None = None, cwd: Path | None = None,
                 host: str = "127.0.0.1", tls: bool = False):
        """`tls`: the service speaks TLS, so readiness is watched on a plaintext health port of its own."""
        self.kind, self.args = kind, list(args)
        self.command, self.cwd = command or [sys.executable, "-m", "vlsplit.cli"], cwd
        self.host = host
        self.port = port or free_port()
        self.metrics_port = free_port()
        self.address = f"{host}:{self.port}"
        self.health_port = free_port() if tls else None
        self.env = {**os.environ, "VLSPLIT_LOG_JSON": "false", **(env or {})}
        if self.health_port:
            self.env["VLSPLIT_HEALTH_PORT"] = str(self.health_port)
        self.log_path = (log_dir or Path("/tmp")) / f"vlsplit-{kind}-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> "Service":
        cmd = [*self.command, "serve", self.kind, "--host", self.host, "--port", str(self.port),
               "--metrics-port", str(self.metrics_port), *self.args]
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.cwd)
        if wait:
            self.wait_serving()
        return self

    def wait_serving(self, timeout: float = READY_TIMEOUT_S) -> None:
        try:
            health = f"{self.host}:{self.health_port}" if self.health_port else self.address
            wait_serving(health, self.proc, self.kind, timeout)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; log:\n{self.tail()}") from None

    def health(self) -> int:
        with grpc.insecure_channel(self.address) as channel:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status

    def samples(self, name: str) -> list:
        """The Prometheus samples called `name`, scraped from /metrics."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(f"http://{self.host}:{self.metrics_port}/metrics", timeout=5).read().decode()
        return [s for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name]

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a Prometheus sample `name` matching `labels`."""
        return sum(s.value for s in self.samples(name) if all(s.labels.get(k) == v for k, v in labels.items()))

    def metrics_by(self, name: str, label: str) -> dict[str, float]:
        """Sample `name` summed by the value of `label`."""
        out: dict[str, float] = {}
        for s in self.samples(name):
            out[s.labels.get(label, "")] = out.get(s.labels.get(label, ""), 0) + s.value
        return out

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@contextmanager
def running(*services):
    """Start Redis servers first, then the services side by side (their models load in parallel), and
    wait for each to serve; kill whatever is still running at the end. Services that need one another
    at start-up (a gateway) go in a `running` of their own, after their upstreams."""
    try:
        for service in services:
            if isinstance(service, Redis):
                service.start()
        for service in services:
            if not isinstance(service, Redis):
                service.start(wait=False)
        for service in services:
            if not isinstance(service, Redis):
                service.wait_serving()
        yield services
    finally:
        for service in reversed(services):
            if isinstance(service, Redis):
                service.stop()
            else:
                service.kill()


def port_file_ports(path: Path) -> dict:
    return json.loads(path.read_text())


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is valid and free too."""
    import socket

    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class RedisCluster:
    """A real Redis Cluster of `masters` redis-server processes (no replicas), created with
    `redis-cli --cluster create`, on free ports, keeping nothing on disk but its node files."""

    def __init__(self, workdir: Path, masters: int = 3):
        self.workdir, self.ports = workdir, [cluster_port() for _ in range(masters)]
        self.nodes: list[Redis] = []
        self.url = f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def start(self) -> "RedisCluster":
        import time

        import redis

        for port in self.ports:
            self.nodes.append(Redis(port, "--cluster-enabled", "yes", "--cluster-config-file",
                                    str(self.workdir / f"nodes-{port}.conf"), "--dir", str(self.workdir)).start())
        subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 60
        for port in self.ports:  # each node agrees the cluster is up (its slots all assigned)
            client = redis.Redis(port=port)
            while client.cluster("info").get("cluster_state") != "ok":
                assert time.monotonic() < deadline, f"cluster node {port} never reached cluster_state:ok"
            client.close()
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
