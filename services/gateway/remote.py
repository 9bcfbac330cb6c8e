"""Image and video URLs of the HTTP API: `data:` URLs, `vlsplit://<image_id>`, and (off by default)
remote `https://` URLs fetched under guard. A clip (a `video_url` part, or `video` in /v1/classify)
takes the same three forms under the same guards; only its byte bound differs (VLSPLIT_MAX_VIDEO_BYTES
instead of VLSPLIT_MAX_IMAGE_BYTES), and its ImageRef carries its sampling (`ImageRef.video`).

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
from shared.image_ids import VideoParams, check_image_id
from vlsplit.v1 import gateway_pb2

from .addresses import refusal

SCHEME = "vlsplit://"
# getaddrinfo blocks a thread until the system resolver gives up: its own few, so that a hanging
# resolver slows remote fetches (each bounded by its time limit) and nothing else on the event loop.
RESOLVER = ThreadPoolExecutor(max_workers=4, thread_name_prefix="vlsplit-resolve")


class ImageUrls:
    def __init__(self, max_bytes: int, remote: bool, timeout_s: float,
                 transport: httpx.AsyncBaseTransport | None = None, max_video_bytes: int = 0):
        """`transport`: what httpx sends through (tests); None = a direct connection. `max_video_bytes`:
        one clip's bound (0 = `max_bytes`)."""
        self.max_bytes, self.remote, self.timeout_s, self.transport = max_bytes, remote, timeout_s, transport
        self.max_video_bytes = max_video_bytes or max_bytes

    async def image_ref(self, url: str, video: VideoParams | None = None) -> gateway_pb2.ImageRef:
        """The ImageRef of an image URL or, with `video` (its sampling), of a clip's URL."""
        what = _Kind(video is not None, self.max_video_bytes if video is not None else self.max_bytes)
        if url.startswith("data:"):
            ref = gateway_pb2.ImageRef(data=self.data_url(url, what))
        elif url.startswith(SCHEME):
            image_id = url[len(SCHEME):]
            check_image_id(image_id)
            ref = gateway_pb2.ImageRef(image_id=image_id)
        elif url.startswith(("http://", "https://")):
            ref = gateway_pb2.ImageRef(data=await self.fetch(url, what))
        else:
            raise InvalidRequest(f"{what.field} must be a data: URL, vlsplit://<image_id> or an https:// URL")
        if video is not None:
            video.to_pb(ref.video)
        return ref

    def data_url(self, url: str, what: "_Kind | None" = None) -> bytes:
        what = what or _Kind(False, self.max_bytes)
        header, sep, body = url.partition(",")
        if not sep or not header.endswith(";base64"):
            example = "data:video/mp4;base64,..." if what.video else "data:image/png;base64,..."
            raise InvalidRequest(f"a data: {what.name} URL must be base64: {example}")
        if not what.video and header.startswith("data:video/"):
            raise InvalidRequest(f"{header.removesuffix(';base64')[5:]} is a video clip: send it in a video_url part "
                                 "(or as `video` in /v1/classify), not as an image_url")
        if len(body) * 3 // 4 > what.limit + 3:
            raise TooLarge(f"the {what.name} is over {what.limit} bytes ({what.setting})")
        try:
            return base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidRequest(f"the data: URL is not valid base64: {exc}") from None

    async def fetch(self, url: str, what: "_Kind | None" = None) -> bytes:
        what = what or _Kind(False, self.max_bytes)
        if not self.remote:
            upload = "POST /v1/videos" if what.video else "POST /v1/images"
            raise InvalidRequest(f"remote {what.name} URLs are off on this gateway (VLSPLIT_REMOTE_IMAGES): send the "
                                 f"{what.name} as a data: URL or upload it ({upload}) and use vlsplit://<id>")
        parts, host, port = _https_target(url)
        try:
            async with asyncio.timeout(self.timeout_s):
                address = await public_address(host, port)
                return await self._get(parts, host, port, address, what)
        except TimeoutError:
            raise InvalidRequest(f"fetching the {what.name} took over {self.timeout_s:g} s "
                                 "(VLSPLIT_REMOTE_IMAGE_TIMEOUT_S)") from None
        except httpx.HTTPError as exc:
            raise InvalidRequest(f"fetching the {what.name} failed: {exc}") from None

    async def _get(self, parts: SplitResult, host: str, port: int, address: str, what: "_Kind") -> bytes:
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
                    raise InvalidRequest(f"fetching the {what.name}: HTTP {response.status_code} "
                                         "(redirects are not followed)")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > what.limit:
                    raise TooLarge(f"the remote {what.name} is over {what.limit} bytes ({what.setting})")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > what.limit:
                        raise TooLarge(f"the remote {what.name} is over {what.limit} bytes ({what.setting})")
                return bytes(body)


class _Kind:
    """What a URL names (an image or a clip) and its byte bound, for the messages."""

    def __init__(self, video: bool, limit: int):
        self.video, self.limit = video, limit
        self.name = "video" if video else "image"
        self.field = "video_url" if video else "image_url"
        self.setting = "VLSPLIT_MAX_VIDEO_BYTES" if video else "VLSPLIT_MAX_IMAGE_BYTES"


def _https_target(url: str) -> tuple[SplitResult, str, int]:
    """The URL's parts, host and port; InvalidRequest unless it is a well-formed https:// URL."""
    try:
        parts = urlsplit(url)
        port = parts.port or 443
    except ValueError as exc:
        raise InvalidRequest(f"the URL is malformed: {exc}") from None
    if parts.scheme != "https":
        raise InvalidRequest("remote image and video URLs must be https://")
    if not parts.hostname:
        raise InvalidRequest("the URL has no host")
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
            raise InvalidRequest(f"the URL's host {host!r} resolves to {why}")
    return addresses[0]


async def _resolve(host: str, port: int) -> list[str]:
    try:
        infos = await asyncio.get_running_loop().run_in_executor(
            RESOLVER, socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise InvalidRequest(f"cannot resolve the URL's host {host!r}: {exc}") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise InvalidRequest(f"cannot resolve the URL's host {host!r}")
    return addresses
