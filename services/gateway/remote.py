"""Image URLs of the HTTP API: `data:` URLs, `vlsplit://<image_id>`, and (off by default) remote
`https://` URLs fetched under guard.

A remote fetch is a request the gateway makes on a client's behalf from inside the cluster (SSRF):
only https, only to public addresses (services/gateway/addresses.py: IPv4 addresses inside IPv6 forms
are unwrapped and checked too), no redirects, no proxy from the environment, at most `max_bytes`, and
all of it (the name's resolution included) within `timeout_s`. The name is resolved once, every address
it resolves to must be public, and the connection goes to the first of them with the original name for
SNI and the certificate check, so DNS cannot be re-pointed in between. A refusal costs no connection.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import SplitResult, urlsplit

import httpx

from shared.errors import InvalidRequest, TooLarge
from shared.image_ids import check_image_id
from vlsplit.v1 import gateway_pb2

from .addresses import refusal

SCHEME = "vlsplit://"
# getaddrinfo blocks a thread until the system resolver gives up: its own few, so that a hanging
# resolver slows remote fetches (each bounded by its time limit) and nothing else on the event loop.
RESOLVER = ThreadPoolExecutor(max_workers=4, thread_name_prefix="vlsplit-resolve")


class ImageUrls:
    def __init__(self, max_bytes: int, remote: bool, timeout_s: float,
                 transport: httpx.AsyncBaseTransport | None = None):
        """`transport`: what httpx sends through (tests); None = a direct connection."""
        self.max_bytes, self.remote, self.timeout_s, self.transport = max_bytes, remote, timeout_s, transport

    async def image_ref(self, url: str) -> gateway_pb2.ImageRef:
        if url.startswith("data:"):
            return gateway_pb2.ImageRef(data=self.data_url(url))
        if url.startswith(SCHEME):
            image_id = url[len(SCHEME):]
            check_image_id(image_id)
            return gateway_pb2.ImageRef(image_id=image_id)
        if url.startswith(("http://", "https://")):
            return gateway_pb2.ImageRef(data=await self.fetch(url))
        raise InvalidRequest("image_url must be a data: URL, vlsplit://<image_id> or an https:// URL")

    def data_url(self, url: str) -> bytes:
        header, sep, body = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise InvalidRequest("a data: image URL must be base64: data:image/png;base64,...")
        if len(body) * 3 // 4 > self.max_bytes + 3:
            raise TooLarge(f"the image is over {self.max_bytes} bytes (VLSPLIT_MAX_IMAGE_BYTES)")
        try:
            return base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidRequest(f"the data: URL is not valid base64: {exc}") from None

    async def fetch(self, url: str) -> bytes:
        if not self.remote:
            raise InvalidRequest("remote image URLs are off on this gateway (VLSPLIT_REMOTE_IMAGES): send the "
                                 "image as a data: URL or upload it (POST /v1/images) and use vlsplit://<id>")
        parts, host, port = _https_target(url)
        try:
            async with asyncio.timeout(self.timeout_s):
                address = await public_address(host, port)
                return await self._get(parts, host, port, address)
        except TimeoutError:
            raise InvalidRequest(f"fetching the image took over {self.timeout_s:g} s "
                                 "(VLSPLIT_REMOTE_IMAGE_TIMEOUT_S)") from None
        except httpx.HTTPError as exc:
            raise InvalidRequest(f"fetching the image failed: {exc}") from None

    async def _get(self, parts: SplitResult, host: str, port: int, address: str) -> bytes:
        literal = f"[{address}]" if ":" in address else address
        target = parts._replace(netloc=f"{literal}:{port}").geturl()
        name = f"[{host}]" if ":" in host else host
        headers = {"Host": name if port == 443 else f"{name}:{port}"}
        # trust_env=False: HTTPS_PROXY / ALL_PROXY / NO_PROXY and .netrc of the gateway's environment are
        # not used (a proxy would resolve the name again, and reach what this gateway cannot)
        async with httpx.AsyncClient(follow_redirects=False, timeout=self.timeout_s, trust_env=False,
                                     transport=self.transport) as client:
            async with client.stream("GET", target, headers=headers, extensions={"sni_hostname": host}) as response:
                if response.status_code != 200:
                    raise InvalidRequest(f"fetching the image: HTTP {response.status_code} "
                                         "(redirects are not followed)")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > self.max_bytes:
                        raise TooLarge(f"the remote image is over {self.max_bytes} bytes (VLSPLIT_MAX_IMAGE_BYTES)")
                return bytes(body)


def _https_target(url: str) -> tuple[SplitResult, str, int]:
    """The URL's parts, host and port; InvalidRequest unless it is a well-formed https:// URL."""
    try:
        parts = urlsplit(url)
        port = parts.port or 443
    except ValueError as exc:
        raise InvalidRequest(f"the image URL is malformed: {exc}") from None
    if parts.scheme != "https":
        raise InvalidRequest("remote image URLs must be https://")
    if not parts.hostname:
        raise InvalidRequest("the image URL has no host")
    return parts, parts.hostname, port


async def public_address(host: str, port: int) -> str:
    """The one address to connect to for `host`; refused unless every address it resolves to is public.
    A literal address is checked as it is (no resolver call); a name is resolved once."""
    try:
        ipaddress.ip_address(host.split("%")[0])
        addresses = [host]
    except ValueError:
        addresses = await _resolve(host, port)
    for address in addresses:
        why = refusal(address)
        if why:
            raise InvalidRequest(f"the image URL's host {host!r} resolves to {why}")
    return addresses[0]


async def _resolve(host: str, port: int) -> list[str]:
    try:
        infos = await asyncio.get_running_loop().run_in_executor(
            RESOLVER, socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise InvalidRequest(f"cannot resolve the image URL's host {host!r}: {exc}") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise InvalidRequest(f"cannot resolve the image URL's host {host!r}")
    return addresses
