"""The server skeleton's health follows the service's own check (shared/server.py `Service.check`): a
real server process whose check reads a file; writing a reason turns every service name NOT_SERVING,
clearing it turns them SERVING again. (The decoder's check is its engine's `health()`:
test_engine_isolation.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent

SERVER = """
import asyncio, sys
from pathlib import Path
from shared.config import ServerConfig
from shared.server import Service, run

flag, port_file = Path(sys.argv[1]), sys.argv[2]

async def start():
    pass

def check():
    text = flag.read_text().strip() if flag.exists() else ""
    return text or None

asyncio.run(run(ServerConfig(port=0, metrics_port=-1, port_file=port_file),
                Service(names=["vlsplit.v1.Probe"], register=lambda server: None, start=start,
                        check=check, check_every_s=0.05)))
"""


def _status(stub, name: str) -> int:
    return stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status


def _wait_status(stub, name: str, want: int, timeout: float = 30) -> None:
    """Follow the health Watch stream until `want` arrives."""
    for reply in stub.Watch(health_pb2.HealthCheckRequest(service=name), timeout=timeout):
        if reply.status == want:
            return
    raise AssertionError(f"health of {name!r} never became {want}")


def test_health_follows_the_service_check(tmp_path):
    flag, port_file = tmp_path / "reason", tmp_path / "port.json"
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(flag), str(port_file)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        port = json.loads(port_file.read_text())["port"]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
            assert _status(stub, "") == _status(stub, "vlsplit.v1.Probe") == serving
            flag.write_text("the engine's step loop has died")
            _wait_status(stub, "vlsplit.v1.Probe", not_serving)
            assert _status(stub, "") == not_serving
            flag.write_text("")
            _wait_status(stub, "", serving)
            assert _status(stub, "vlsplit.v1.Probe") == serving
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "NOT_SERVING: the engine's step loop has died" in out
    assert "serving again" in out
