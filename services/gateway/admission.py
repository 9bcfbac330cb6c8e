"""Payload admission: what keeps the gateway from encoding images a decoder must refuse, and from
holding more embedding payloads at once than it can afford.

- Each decoder advertises, in GetModelInfo, the most payload bytes one request may send it and how to
  size a payload (values per image token, the processor's resize rule). Before a request's images are
  encoded, the gateway estimates their payloads from the images' headers and refuses the request
  (INVALID_ARGUMENT naming the decoder's limit) when the estimate is over it. The estimate is a lower
  bound (2-byte values, the smallest payload dtype; an image whose size cannot be read counts as the
  smallest image), so nothing the decoder would take is refused here.
- Payloads fetched for decoders (cache or encoder) are held until their call ends; all requests'
  together stay under `max_payload_bytes_in_flight` (0 = 4 x the decoder's limit): one more is
  RESOURCE_EXHAUSTED with a retry hint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from prometheus_client import Gauge

from shared.errors import Overloaded, TooLarge, Unavailable, Upstream
from shared.image_size import image_size, image_tokens
from vlsplit.v1 import common_pb2

MIN_VALUE_BYTES = 2  # bfloat16 / float16: the smallest dtype a payload travels in
LIMITS_TTL_S = 60.0  # a decoder's advertised limits are asked again after this
IN_FLIGHT = Gauge("vlsplit_gateway_payload_bytes_in_flight", "Embedding payload bytes held for calls in progress")


@dataclass(frozen=True)
class DecoderLimits:
    max_payload_bytes: int
    values_per_token: int
    rule: common_pb2.ImageTokenRule
    max_model_len: int = 0  # 0: not advertised

    @classmethod
    def from_pb(cls, info: common_pb2.ModelInfo) -> "DecoderLimits | None":
        """None for a decoder that advertises no limit (an older one)."""
        if not info.max_payload_bytes or not info.payload_values_per_token or not info.image_tokens.patch_size:
            return None
        return cls(info.max_payload_bytes, info.payload_values_per_token, info.image_tokens, info.max_model_len)

    @property
    def max_tokens(self) -> int:
        """The most image (or clip) tokens one request may send this decoder: its payload bytes, and its
        context when it advertises one."""
        tokens = self.max_payload_bytes // (self.values_per_token * MIN_VALUE_BYTES)
        return min(tokens, self.max_model_len) if self.max_model_len else tokens

    def estimate(self, data: bytes | None) -> int:
        """A lower bound on the payload bytes of the image `data` (None: an image sent by id)."""
        r = self.rule
        tokens = image_tokens(image_size(data) if data else None, r.patch_size, r.merge_size, r.min_pixels,
                              r.max_pixels)
        return tokens * self.values_per_token * MIN_VALUE_BYTES


class PayloadAdmission:
    def __init__(self, max_in_flight: int = 0):
        self.max_in_flight = max_in_flight  # 0: 4 x the decoder's max_payload_bytes
        self.in_flight = 0
        self._limits: dict[str, tuple[float, DecoderLimits | None]] = {}

    async def limits(self, replica: str, model_info: Callable[[], Awaitable[common_pb2.ModelInfo]],
                     ) -> DecoderLimits | None:
        """`replica`'s advertised limits (asked once a minute); None while it cannot be asked."""
        known = self._limits.get(replica)
        if known is not None and time.monotonic() - known[0] < LIMITS_TTL_S:
            return known[1]
        try:
            limits = DecoderLimits.from_pb(await model_info())
        except (Unavailable, Upstream):
            return None  # the call itself fails over or reports it
        self._limits[replica] = (time.monotonic(), limits)
        return limits

    def forget(self) -> None:
        """The served model changed: ask the decoders again."""
        self._limits.clear()

    def check(self, limits: DecoderLimits | None, images: list[bytes | None]) -> tuple[int, int]:
        """(the images' estimated payload bytes, the in-flight budget they count against); refused when over
        the decoder's limit or the whole budget. (0, 0) when the decoder advertises nothing."""
        if limits is None or not images:
            return 0, 0
        estimate = sum(limits.estimate(data) for data in images)
        if estimate > limits.max_payload_bytes:
            raise TooLarge(f"the request's {len(images)} image(s) make at least {estimate} bytes of embeddings; the "
                           f"decoder takes at most {limits.max_payload_bytes} per request (its VLSPLIT_MAX_PAYLOAD_BYTES):"
                           " send fewer or smaller images")
        budget = self.max_in_flight or 4 * limits.max_payload_bytes
        if estimate > budget:
            raise TooLarge(f"the request's images make at least {estimate} bytes of embeddings; the gateway holds at "
                           f"most {budget} (VLSPLIT_MAX_PAYLOAD_BYTES_IN_FLIGHT)")
        return estimate, budget

    def hold(self, n: int, budget: int) -> None:
        """Count `n` payload bytes as held; refused (retry later) when that would pass `budget`."""
        if n and self.in_flight + n > budget:
            raise Overloaded(f"the gateway holds {self.in_flight} bytes of embedding payloads for calls in progress; "
                             f"{n} more would pass {budget} (VLSPLIT_MAX_PAYLOAD_BYTES_IN_FLIGHT): retry later",
                             retry_after_s=1.0)
        self.grow(n)

    def grow(self, n: int) -> None:
        self.in_flight += n
        IN_FLIGHT.set(self.in_flight)
