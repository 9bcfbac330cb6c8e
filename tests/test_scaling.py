"""Scaling with real processes on loopback, under a steady stream of questions about new and repeated images.

The gateway finds encoders and decoders by DNS name, as in Kubernetes (headless Services) and compose:
`enc.vlsplit.test` and `dec.vlsplit.test`, resolved through a hosts file of the test's own that is
bind-mounted over /etc/hosts in the gateway's private mount namespace (`unshare --mount`); replicas
listen on their own loopback addresses (127.0.0.2, .3, .4) with the same port, like pods. Adding a line
is a pod coming up, removing it a pod going away; nothing else on the machine sees the file.

1 encoder + 1 decoder -> a second of each joins (the gateway uses them without restart: per-replica
request metrics) -> SIGTERM the first of each (they drain; in-flight requests finish) -> a third encoder
joins and is SIGKILLed while it holds an encode (the request is retried on the other). No request fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

from load import Stream
from procs import Redis, Service, free_port
from test_encoder_service import wait_for

ENCODER_NAME, DECODER_NAME = "enc.vlsplit.test", "dec.vlsplit.test"


class HostsFile:
    """The gateway's /etc/hosts: names -> the loopback addresses of the replicas that are up.
    Rewritten in place (same inode), so the bind mount keeps showing the current contents."""

    def __init__(self, path: Path):
        self.path, self.entries = path, {ENCODER_NAME: [], DECODER_NAME: []}
        self.write()

    def write(self) -> None:
        lines = ["127.0.0.1 localhost", "::1 localhost"]
        lines += [f"{ip} {name}" for name, ips in self.entries.items() for ip in ips]
        with open(self.path, "r+" if self.path.exists() else "w") as f:
            f.seek(0)
            f.truncate()
            f.write("\n".join(lines) + "\n")

    def add(self, name: str, ip: str) -> None:
        self.entries[name].append(ip)
        self.write()

    def remove(self, name: str, ip: str) -> None:
        self.entries[name].remove(ip)
        self.write()


def private_hosts_command(hosts: Path) -> list[str]:
    """`python -m vlsplit.cli`, run in a mount namespace of its own where `hosts` is /etc/hosts."""
    unshare = shutil.which("unshare")
    assert unshare, "unshare (util-linux) is needed to give the gateway its own /etc/hosts"
    userns = [] if os.geteuid() == 0 else ["--map-root-user"]
    return [unshare, "--mount", *userns, "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts),
            sys.executable, "-m", "vlsplit.cli"]


@pytest.fixture
def procs():
    started: list = []
    yield started
    for proc in reversed(started):
        proc.stop() if isinstance(proc, Redis) else proc.kill()


def test_scale_out_drain_and_kill_under_a_steady_stream(tiny_models, tmp_path, procs):
    model = tiny_models["qwen2_vl"]
    hosts = HostsFile(tmp_path / "hosts")
    encoder_port, decoder_port = free_port(), free_port()
    redis = Redis().start()
    procs.append(redis)
    # Encoders release the cross-replica lock of a killed peer after 3 s; drains are short.
    common = {"VLSPLIT_DRAIN_S": "1", "VLSPLIT_GRACE_S": "30"}

    def encoder(ip: str, wait: bool = True, **env: str) -> Service:
        service = Service("encoder", "--model", model, "--redis", redis.url, host=ip, port=encoder_port,
                          env={**common, "VLSPLIT_ENCODE_LOCK_S": "3", **env}, log_dir=tmp_path)
        return join(ENCODER_NAME, service, wait)

    def decoder(ip: str, wait: bool = True) -> Service:
        service = Service("decoder", "--model", model, host=ip, port=decoder_port, env=common, log_dir=tmp_path)
        return join(DECODER_NAME, service, wait)

    def join(name: str, service: Service, wait: bool) -> Service:
        """Start `service`; once it serves, its address joins the name (as a ready pod joins endpoints).
        wait=False: started only, so that several load side by side; `ready` joins them."""
        procs.append(service)
        service.start(wait)
        if wait:
            hosts.add(name, service.host)
        return service

    def ready(*pairs: tuple[str, Service]) -> None:
        for name, service in pairs:
            service.wait_serving()
            hosts.add(name, service.host)

    e1, d1 = encoder("127.0.0.2", wait=False), decoder("127.0.0.2", wait=False)  # loading side by side
    ready((ENCODER_NAME, e1), (DECODER_NAME, d1))
    gateway = Service("gateway", "--encoder", f"{ENCODER_NAME}:{encoder_port}",
                      "--decoder", f"{DECODER_NAME}:{decoder_port}", "--redis", redis.url,
                      env={"VLSPLIT_DECODER_RESOLVE_S": "0.5"}, command=private_hosts_command(hosts.path),
                      log_dir=tmp_path)
    procs.append(gateway)
    gateway.start()

    def requests_to(kind: str, replica: Service | str) -> float:
        replica = replica.address if isinstance(replica, Service) else replica
        return gateway.metric(f"vlsplit_gateway_{kind}_requests_total", replica=replica)

    def by_replica(kind: str) -> dict[str, float]:
        return gateway.metrics_by(f"vlsplit_gateway_{kind}_requests_total", "replica")

    stream = Stream(gateway.address)
    try:
        stream.wait_more(6)
        # a name with one address is one replica, labelled by the name (gRPC resolves it itself)
        assert requests_to("encoder", f"{ENCODER_NAME}:{encoder_port}") > 0
        assert requests_to("decoder", f"{DECODER_NAME}:{decoder_port}") > 0

        # scale out: a second encoder and decoder come up; the gateway finds them by name
        e2, d2 = encoder("127.0.0.3", wait=False), decoder("127.0.0.3", wait=False)  # loading side by side
        ready((ENCODER_NAME, e2), (DECODER_NAME, d2))
        wait_for(lambda: requests_to("encoder", e2) > 0 and requests_to("decoder", d2) > 0, 120)
        stream.wait_more(3)

        # scale in: SIGTERM the first of each (drain, then stop); they leave DNS as pods leave endpoints
        for name, service in ((ENCODER_NAME, e1), (DECODER_NAME, d1)):
            hosts.remove(name, service.host)
            service.proc.send_signal(signal.SIGTERM)
        assert e1.proc.wait(timeout=90) == 0 and d1.proc.wait(timeout=90) == 0
        gone = requests_to("encoder", e1), requests_to("decoder", d1)
        stream.wait_more(6)
        assert (requests_to("encoder", e1), requests_to("decoder", d1)) == gone  # nothing sent to them since

        # a third encoder that holds every image it gets (its batch never closes), SIGKILLed mid-encode
        e3 = encoder("127.0.0.4", VLSPLIT_ENCODE_MAX_WAIT_MS="600000", VLSPLIT_ENCODE_MAX_BATCH="64")
        wait_for(lambda: e3.metric("vlsplit_in_flight_requests", method="Encode") >= 1, 120)
        e3.proc.send_signal(signal.SIGKILL)
        e3.proc.wait(timeout=30)
        hosts.remove(ENCODER_NAME, e3.host)
        wait_for(lambda: gateway.metric("vlsplit_gateway_encoder_failovers_total") >= 1, 60)
        stream.wait_more(6)
    finally:
        counts = stream.close()
    print(f"\nscaling stream: {stream.summary()}\n"
          f"  encode calls by replica {by_replica('encoder')}\n  generate calls by replica {by_replica('decoder')}\n"
          f"  encoder failovers {gateway.metric('vlsplit_gateway_encoder_failovers_total'):.0f}")
    assert counts["failed"] == 0, stream.errors[:5]
    assert counts["sent"] == counts["succeeded"]
    assert stream.mismatches == []
    assert e2.metric("vlsplit_encoder_encodes_total") > 0
