"""`vlsplit up`: every service on this machine, as child processes, until Ctrl-C.

Order: Redis (a private redis-server on a free port, unless told otherwise), then encoder and
decoder side by side (each waited on until its health service says SERVING), then the gateway. Stopping sends
SIGTERM to all, so in-flight requests finish, and the private Redis goes with them.
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_FAMILY = "qwen2_vl"
READY_TIMEOUT_S = 600


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on, for a server this process starts next. Taken below the
    kernel's ephemeral range (net.ipv4.ip_local_port_range), where no outgoing connection's source port can
    take it before the server binds it, and never handed out twice by one process."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(10000, low)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as s:  # a crowded range: any port the kernel has free
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    return low if low > 11000 else 32768


def start_redis(port: int, *options: str) -> subprocess.Popen:
    """A private, non-persistent redis-server on 127.0.0.1:`port` (plus `options`, e.g.
    "--proto-max-bulk-len", "1mb"), returned once it accepts connections (its own "Ready to accept
    connections" log line: no polling)."""
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", *options], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    for line in proc.stdout:
        if "Ready to accept connections" in line:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining its log
            return proc
    raise RuntimeError(f"redis-server on port {port} exited with {proc.wait()}")


def wait_serving(address: str, proc: subprocess.Popen, name: str, timeout: float = READY_TIMEOUT_S) -> None:
    """Block until `address` reports SERVING on grpc.health.v1 (streamed, no polling). A process that exits
    first ends the wait at once (the watch is cancelled), not after `timeout`."""
    with grpc.insecure_channel(address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=timeout,
                                                          wait_for_ready=True)
        threading.Thread(target=lambda: (proc.wait(), watch.cancel()), daemon=True,
                         name=f"{name}-exit-watch").start()
        try:
            for reply in watch:
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError as exc:
            state = f"exited with {proc.returncode}" if proc.poll() is not None else "did not become ready"
            raise RuntimeError(f"{name} {state} ({exc.code().name}); see its log above") from None


@dataclass
class Stack:
    model: Path
    redis: str | None = None  # URL, "memory", or None = private redis-server if available
    gateway_port: int = 50051
    http_port: int = 8080  # the OpenAI-compatible API and web page; -1 = off
    host: str = "127.0.0.1"
    dtype: str | None = None  # None: the services' own default (VLSPLIT_DTYPE, else auto)
    quantize: tuple[str | None, str | None] = (None, None)  # encoder's, decoder's; None: VLSPLIT_QUANTIZE, else off
    # torch threads of the encoder and the decoder; None: each uses every usable CPU. One image's encode
    # and its prefill/decode run one after the other, so on a small machine neither should own half the cores.
    threads: tuple[int | None, int | None] = (None, None)
    encoder_backend: str | None = None  # None: VLSPLIT_ENCODER_BACKEND, else torch
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    metrics_ports: dict[str, int] = field(default_factory=dict)  # service -> its Prometheus port

    def start(self) -> str:
        from tqdm import tqdm

        redis_url = self._redis()
        encoder, decoder = f"{self.host}:{free_port()}", f"{self.host}:{free_port()}"
        common = ["--log-json", "false", *_flag("--dtype", self.dtype)]
        gateway = f"{self.host}:{self.gateway_port}"
        services = [("encoder", encoder, "--model", str(self.model), "--redis", redis_url, *common,
                     *_flag("--quantize", self.quantize[0]), *_flag("--torch-threads", self.threads[0]),
                     *_flag("--backend", self.encoder_backend)),
                    ("decoder", decoder, "--model", str(self.model), *common,
                     *_flag("--quantize", self.quantize[1]), *_flag("--torch-threads", self.threads[1])),
                    ("gateway", gateway, "--encoder", encoder, "--decoder", decoder, "--redis", redis_url,
                     "--http-port", str(self.http_port), "--log-json", "false")]
        # a bar on a terminal (loading a real checkpoint takes a while), plain lines otherwise; the two models
        # load side by side, the gateway starts once both serve
        with tqdm(total=len(services), desc="starting vlsplit", unit="service", file=sys.stderr,
                  disable=None) as bar:
            for group in (services[:2], services[2:]):
                bar.set_postfix_str("loading " + " and ".join(name for name, *_ in group))
                started = [self._spawn(*service) for service in group]
                for (name, address, *_), (proc, start) in zip(group, started):
                    wait_serving(address, proc, name)
                    tqdm.write(f"{name}: serving on {address} ({time.perf_counter() - start:.1f}s)", file=sys.stderr)
                    bar.update(1)
        return gateway

    def _redis(self) -> str:
        if self.redis:
            return self.redis
        if shutil.which("redis-server") is None:
            print("redis-server not found: using an in-process cache (--redis memory)", file=sys.stderr)
            return "memory"
        port = free_port()
        self.procs.append(("redis", start_redis(port)))
        print(f"redis: private redis-server on 127.0.0.1:{port}", file=sys.stderr)
        return f"redis://127.0.0.1:{port}/0"

    def _spawn(self, name: str, address: str, *args: str) -> tuple[subprocess.Popen, float]:
        host, port = address.rsplit(":", 1)
        self.metrics_ports[name] = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "vlsplit.cli", "serve", name, "--host", host,
                                 "--port", port, "--metrics-port", str(self.metrics_ports[name]), *args])
        self.procs.append((name, proc))
        return proc, time.perf_counter()

    def wait(self) -> None:
        """Until Ctrl-C / SIGTERM, or until a child dies."""
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.is_set():
            dead = [(n, p.returncode) for n, p in self.procs if p.poll() is not None]
            if dead:
                print(f"{dead[0][0]} exited with {dead[0][1]}; stopping", file=sys.stderr)
                return
            stop.wait(1.0)

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in reversed(self.procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                print(f"{name} did not stop in 30s; killing it", file=sys.stderr)
                proc.kill()


def _flag(name: str, value) -> list[str]:
    return [] if value is None else [name, str(value)]


def default_model() -> Path:
    """The embedded default: a tiny random-weight checkpoint, built on first use."""
    from shared.config import cache_dir

    path = cache_dir() / "models" / f"tiny-{DEFAULT_FAMILY}"
    if not (path / "config.json").is_file():
        from services.model_builder import make_model

        print(f"building the embedded default model in {path} ...", file=sys.stderr)
        make_model(path, DEFAULT_FAMILY, "tiny", seed=0)
    return path
