"""The gateway's HTTP port is as strict as its gRPC port: with VLSPLIT_TLS_CLIENT_CA it accepts only
clients holding a certificate from that CA, and a certificate rewritten on disk reaches new connections
without a restart. A real gateway process (its upstreams need not exist: the page needs none)."""

from __future__ import annotations

import hashlib
import socket
import ssl
import time

import pytest

from procs import Service, free_port, running
from test_tls import NAMES, Pem, Pki, tls_env


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("http-pki"))


def get_page(port: int, ca, client: Pem | None = None) -> tuple[int, bytes]:
    """GET / over TLS: (HTTP status, the server certificate's sha256)."""
    context = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        context.load_cert_chain(str(client.cert), str(client.key))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            served = hashlib.sha256(tls.getpeercert(binary_form=True)).digest()
            tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            head = tls.recv(64)
    return int(head.split()[1]), served


def refused(port: int, ca) -> bool:
    """No client certificate: the handshake (or the first read after it, in TLS 1.3) fails."""
    try:
        get_page(port, ca)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError, IndexError, ValueError):
        return True
    return False


def test_http_port_requires_client_certificates_and_reloads_its_own(pki, tmp_path):
    server = pki.issue("one", "gateway-http", *NAMES)
    client, rogue = pki.issue("two", "http-client"), pki.issue("rogue", "http-rogue")
    http_port = free_port()
    gateway = Service("gateway", "--encoder", f"127.0.0.1:{free_port()}", "--decoder", f"127.0.0.1:{free_port()}",
                      "--redis", "memory", "--http-port", str(http_port), tls=True, log_dir=tmp_path,
                      env=tls_env(server, client_ca=pki.ca("two")))
    ca = pki.ca("one")
    with running(gateway):
        assert refused(http_port, ca)  # no client certificate
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError, IndexError, ValueError)):
            get_page(http_port, ca, rogue)  # a certificate from another CA
        status, before = get_page(http_port, ca, client)
        assert status == 200
        pki.write(server, "one", *NAMES)  # rotated in place
        deadline = time.monotonic() + 10
        while (after := get_page(http_port, ca, client))[1] == before and time.monotonic() < deadline:
            time.sleep(0.2)
        assert after[0] == 200 and after[1] != before  # a new connection sees the new certificate


def test_client_ca_without_a_certificate_refuses_to_start(pki, tmp_path):
    gateway = Service("gateway", "--http-port", str(free_port()), log_dir=tmp_path,
                      env={"VLSPLIT_TLS_CLIENT_CA": str(pki.ca("one"))})
    gateway.start(wait=False)
    assert gateway.proc.wait(timeout=60) != 0
    assert "VLSPLIT_TLS_CERT" in gateway.tail()
