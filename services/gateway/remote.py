"""Image URLs of the HTTP API: `data:` URLs, `vlsplit://<image_id>`, and (off by default) remote
`https://` URLs fetched under guard.

A remote fetch is a request the gateway makes on a client's behalf from inside the cluster (SSRF):
only https, only to public addresses (the name is resolved once, every address must be global, and
the connection goes to that address with the original name for SNI and certificate checks, so DNS
cannot be re-pointed in between), no redirects, at most `max_bytes` within `timeout_s`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from urllib.parse import urlsplit

import httpx

from shared.errors import InvalidRequest, TooLarge
from shared.image_ids import check_image_id
from vlsplit.v1 import gateway_pb2

SCHEME = "vlsplit://"


class ImageUrls:
    def __init__(self, max_bytes: int, remote: bool, timeout_s: float):
        self.max_bytes, self.remote, self.timeout_s = max_bytes, remote, timeout_s

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
        parts = urlsplit(url)
        if parts.scheme != "https":
            raise InvalidRequest("remote image URLs must be https://")
        if not parts.hostname:
            raise InvalidRequest("the image URL has no host")
        port = parts.port or 443
        address = await public_address(parts.hostname, port)
        target = parts._replace(netloc=f"[{address}]:{port}" if ":" in address else f"{address}:{port}").geturl()
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._get(target, parts.hostname)
        except TimeoutError:
            raise InvalidRequest(f"fetching the image took over {self.timeout_s:g} s (VLSPLIT_REMOTE_IMAGE_TIMEOUT_S)") from None
        except httpx.HTTPError as exc:
            raise InvalidRequest(f"fetching the image failed: {exc}") from None

    async def _get(self, target: str, host: str) -> bytes:
        async with httpx.AsyncClient(follow_redirects=False, timeout=self.timeout_s) as client:
            async with client.stream("GET", target, headers={"Host": host},
                                     extensions={"sni_hostname": host}) as response:
                if response.status_code != 200:
                    raise InvalidRequest(f"fetching the image: HTTP {response.status_code} (redirects are not followed)")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > self.max_bytes:
                        raise TooLarge(f"the remote image is over {self.max_bytes} bytes (VLSPLIT_MAX_IMAGE_BYTES)")
                return bytes(body)


async def public_address(host: str, port: int) -> str:
    """The one address to connect to for `host`; refused unless every address it resolves to is global."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise InvalidRequest(f"cannot resolve the image URL's host {host!r}: {exc}") from None
    addresses = [info[4][0] for info in infos]
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if not ip.is_global or ip.is_multicast:
            raise InvalidRequest(f"the image URL's host {host!r} resolves to {ip}, which is not a public address")
    if not addresses:
        raise InvalidRequest(f"cannot resolve the image URL's host {host!r}")
    return addresses[0]
