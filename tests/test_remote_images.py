"""Remote image URLs (VLSPLIT_REMOTE_IMAGES=true) are requests the gateway makes on a client's behalf:
an IPv4 address inside an IPv6 form (NAT64, 6to4, Teredo, IPv4-mapped/-compatible/-translated, ISATAP)
is unwrapped and checked as IPv4; the name is resolved once, within the fetch's time limit, and the
connection goes to the address checked (no second resolution: DNS rebinding); proxy variables in the
gateway's environment are ignored; a refusal is immediate and names its reason."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import openai
import pytest

from procs import Service
from services.gateway.remote import ImageUrls, public_address
from shared.errors import InvalidRequest
from services.launcher import free_port

LOOPBACK = "embeds 127.0.0.1"
REFUSED = [  # (address, what the refusal must say)
    ("64:ff9b::7f00:1", LOOPBACK),  # NAT64 well-known prefix
    ("64:ff9b::a9fe:a9fe", "embeds 169.254.169.254"),  # NAT64 to the cloud metadata service
    ("64:ff9b::a00:8", "embeds 10.0.0.8"),
    ("64:ff9b:1::7f00:1", LOOPBACK),  # local-use NAT64 (RFC 8215)
    ("64:ff9b:1::808:808", "not a public address"),  # local-use NAT64: never global, whatever it embeds
    ("2002:7f00:1::1", LOOPBACK),  # 6to4
    ("2002:c0a8:114::1", "embeds 192.168.1.20"),
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", LOOPBACK),  # Teredo: client 127.0.0.1 (XOR 0xffffffff)
    ("2001:0:4136:e378:8000:63bf:f5ff:fff7", "embeds 10.0.0.8"),
    ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", "not a public address"),  # Teredo, public client: not global
    ("::ffff:127.0.0.1", LOOPBACK),  # IPv4-mapped
    ("::ffff:a9fe:a9fe", "embeds 169.254.169.254"),
    ("::127.0.0.1", LOOPBACK),  # IPv4-compatible (deprecated)
    ("::a00:8", "embeds 10.0.0.8"),
    ("::ffff:0:7f00:1", LOOPBACK),  # IPv4-translated (SIIT)
    ("2600::200:5efe:7f00:1", LOOPBACK),  # ISATAP interface id, under a global prefix
    ("2600::5efe:a00:8", "embeds 10.0.0.8"),
    ("fec0::1", "not a public address"),  # site-local (deprecated, not global)
    ("fe80::1", "not a public address"),
    ("fd00::1", "not a public address"),
    ("::1", "not a public address"),
    ("::", "not a public address"),
    ("ff02::1", "not a public address"),
    ("127.0.0.1", "not a public address"),
    ("100.64.0.1", "not a public address"),
    ("224.0.0.1", "not a public address"),
]
ALLOWED = ["8.8.8.8", "2001:4860:4860::8888", "64:ff9b::808:808", "2002:808:808::1", "::ffff:8.8.8.8",
           "2600::200:5efe:808:808"]


@pytest.mark.parametrize("address, reason", REFUSED)
def test_embedded_and_private_addresses_are_refused(address, reason):
    with pytest.raises(InvalidRequest) as info:
        asyncio.run(public_address(address, 443))
    assert reason in str(info.value), str(info.value)
    assert "not a public address" in str(info.value)


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_pass(address):
    assert asyncio.run(public_address(address, 443)) == address


def test_resolution_is_bounded_by_the_fetch_time_limit(monkeypatch):
    """A resolver that hangs costs the fetch's time limit, not the resolver's own timeouts."""
    def slow_getaddrinfo(*args, **kwargs):
        time.sleep(3)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 443))]

    monkeypatch.setattr(socket, "getaddrinfo", slow_getaddrinfo)
    urls = ImageUrls(1 << 20, remote=True, timeout_s=0.3)
    start = time.monotonic()
    with pytest.raises(InvalidRequest, match="VLSPLIT_REMOTE_IMAGE_TIMEOUT_S"):
        asyncio.run(urls.fetch("https://slow.example/cat.png"))
    assert time.monotonic() - start < 2


def test_connection_goes_to_the_address_checked(monkeypatch):
    """DNS rebinding: the name is resolved once; a second answer (loopback) is never asked for or used."""
    answers = iter(["93.184.216.34", "127.0.0.1", "127.0.0.1"])
    calls = []

    def rebinding_getaddrinfo(host, port, *args, **kwargs):
        calls.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"image bytes")

    monkeypatch.setattr(socket, "getaddrinfo", rebinding_getaddrinfo)
    urls = ImageUrls(1 << 20, remote=True, timeout_s=5, transport=httpx.MockTransport(handler))
    assert asyncio.run(urls.fetch("https://images.example/cat.png")) == b"image bytes"
    assert calls == ["images.example"]
    sent = [(r.url.host, r.url.port or 443, r.headers["host"]) for r in seen]
    assert sent == [("93.184.216.34", 443, "images.example")]


def test_malformed_remote_urls_are_invalid_requests():
    urls = ImageUrls(1 << 20, remote=True, timeout_s=1)
    for url in ("https://example.com:99999/x.png", "https://[::1/x.png", "https:///x.png"):
        with pytest.raises(InvalidRequest):
            asyncio.run(urls.fetch(url))


class ProxyTrap:
    """A TCP listener standing in for a proxy: it counts connections and never answers."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def remote_gateway(stack, tmp_path_factory):
    """A gateway with remote images on, whose environment points every proxy variable at a trap."""
    trap = ProxyTrap()
    proxy = f"http://127.0.0.1:{trap.port}"
    port = free_port()
    gateway = Service("gateway", "--encoder", stack.encoder.address, "--decoder", stack.decoder.address,
                      "--redis", stack.url, "--http-port", str(port), log_dir=tmp_path_factory.mktemp("remote"),
                      env={"VLSPLIT_REMOTE_IMAGES": "true", "VLSPLIT_REMOTE_IMAGE_TIMEOUT_S": "2",
                           "HTTPS_PROXY": proxy, "https_proxy": proxy, "ALL_PROXY": proxy, "all_proxy": proxy,
                           "HTTP_PROXY": proxy, "http_proxy": proxy,
                           # the gateway's own gRPC to encoders/decoders honours proxies too: not through the trap
                           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}).start()
    with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0) as client:
        client.models.list()  # the model name is known from here on
        yield client, trap, gateway
    gateway.kill()
    trap.close()


def _chat(client: openai.OpenAI, url: str):
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "x"}]
    return client.chat.completions.create(model="qwen2_vl", messages=[{"role": "user", "content": content}],
                                          max_tokens=2)


IPV6_FORMS = ["64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b:1::7f00:1", "2002:7f00:1::1",
              "2001:0:4136:e378:8000:63bf:80ff:fffe", "::ffff:127.0.0.1", "::ffff:7f00:1", "::127.0.0.1",
              "::ffff:0:7f00:1", "2600::200:5efe:7f00:1"]


@pytest.mark.parametrize("stack", ["qwen2_vl"], indirect=True)
def test_ipv4_smuggled_in_ipv6_urls_is_refused_at_once(remote_gateway):
    client, trap, gateway = remote_gateway
    for address in IPV6_FORMS:
        start = time.monotonic()
        with pytest.raises(openai.BadRequestError) as err:
            _chat(client, f"https://[{address}]/cat.png")
        elapsed = time.monotonic() - start
        body = err.value.body
        assert err.value.status_code == 400 and body["type"] == "invalid_request_error", (address, body)
        assert "embeds" in body["message"] and "not a public address" in body["message"], (address, body)
        assert elapsed < 0.5, f"{address}: refused after {elapsed:.2f} s (a connection was attempted?)"
    assert trap.connections == 0
    assert gateway.health() == 1


@pytest.mark.parametrize("stack", ["qwen2_vl"], indirect=True)
def test_proxy_variables_in_the_gateways_environment_are_ignored(remote_gateway):
    client, trap, gateway = remote_gateway
    with pytest.raises(openai.BadRequestError) as err:  # no network here: the direct connection fails
        _chat(client, "https://1.1.1.1/vlsplit-test.png")
    assert "fetching the image" in err.value.body["message"]
    assert trap.connections == 0, "the fetch went through HTTPS_PROXY / ALL_PROXY"
    assert gateway.health() == 1
