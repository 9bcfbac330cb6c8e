"""The gateway's payload admission (services/gateway/admission.py) on its own: the per-request check
against a decoder's advertised limit, and the gateway-wide budget of payload bytes in flight that
concurrent calls share (held until each call ends, then released). The end-to-end refusal before
encoding runs against real processes in test_http_strict.py."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from services.gateway.admission import DecoderLimits, PayloadAdmission
from shared.errors import Overloaded, TooLarge
from vlsplit.v1 import common_pb2

RULE = common_pb2.ImageTokenRule(patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=1024 * 1024)


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def test_the_estimate_follows_the_processor_and_the_limit_names_its_setting():
    limits = DecoderLimits(max_payload_bytes=10_000_000, values_per_token=1536, rule=RULE)
    small, big = limits.estimate(_png(56, 56)), limits.estimate(_png(1000, 1000))
    assert small == 4 * 1536 * 2  # 56x56 -> 4 merged tokens, 2 bytes a value at least
    assert big > 100 * small
    admission = PayloadAdmission()
    assert admission.check(limits, [_png(56, 56)]) == (small, 4 * 10_000_000)
    with pytest.raises(TooLarge, match="VLSPLIT_MAX_PAYLOAD_BYTES"):
        admission.check(limits, [_png(1000, 1000)] * 16)
    assert admission.check(None, [_png(56, 56)]) == (0, 0)  # a decoder that advertises nothing: no estimate


def test_payload_bytes_in_flight_are_bounded_across_calls_and_released():
    admission = PayloadAdmission(max_in_flight=1000)
    limits = DecoderLimits(max_payload_bytes=800, values_per_token=1, rule=RULE)
    with pytest.raises(TooLarge, match="VLSPLIT_MAX_PAYLOAD_BYTES_IN_FLIGHT"):
        PayloadAdmission(max_in_flight=4).check(limits, [_png(56, 56)])  # 8 bytes can never fit 4
    admission.hold(600, 1000)  # call 1 holds its payloads
    with pytest.raises(Overloaded, match="VLSPLIT_MAX_PAYLOAD_BYTES_IN_FLIGHT") as refused:
        admission.hold(500, 1000)  # call 2 would pass the budget: retry later
    assert refused.value.retry_after_s == 1.0
    assert admission.in_flight == 600  # a refusal holds nothing
    admission.hold(400, 1000)  # exactly at the budget: admitted
    admission.grow(-600)  # call 1 ends: its bytes are let go
    admission.hold(500, 1000)
    assert admission.in_flight == 900
