"""The HTTP API is as strict as gRPC: every field of every body validated before work starts (a
client's mistake is a 4xx in OpenAI's error shape, never a 500), unsupported fields refused by name,
every bound checked before an image is fetched, payloads a decoder must refuse refused before the tower
runs, and the page served under a strict Content-Security-Policy. Real processes, real HTTP."""

from __future__ import annotations

import base64
import collections
import io

import httpx
import pytest
from PIL import Image

from conftest import make_image
from stack import Stack

pytestmark = pytest.mark.parametrize("stack", ["qwen2_vl"], indirect=True)

MODEL = "qwen2_vl"
HI = [{"role": "user", "content": "hi"}]


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def with_image(url: str, text: str = "What is this?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def chat(base: str, body=None, content: bytes | None = None, timeout: float = 60) -> httpx.Response:
    if content is not None:
        return httpx.post(base + "/chat/completions", content=content, timeout=timeout,
                          headers={"Content-Type": "application/json"})
    return httpx.post(base + "/chat/completions", json=body, timeout=timeout)


def assert_openai_error(response: httpx.Response, status: int | None = None) -> dict:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    if status is not None:
        assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str), error
    return error


def test_known_500s_are_400s_naming_the_field(stack):
    cases = [({"response_format": {"type": "json_schema", "json_schema": "x"}}, "response_format.json_schema"),
             ({"max_tokens": 10**12}, "max_tokens"),
             ({"max_completion_tokens": 10**12}, "max_completion_tokens"),
             ({"n": 10**12}, "n"), ({"top_k": 10**12}, "top_k")]
    for extra, param in cases:
        error = assert_openai_error(chat(stack.http_url, {"model": MODEL, "messages": HI, **extra}), 400)
        assert error["param"] == param, (extra, error)


@pytest.mark.parametrize("field, value", [
    ("logit_bias", {"50256": -100}), ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("tool_choice", "auto"), ("functions", [{"name": "f"}]), ("function_call", "auto"), ("audio", {"voice": "x"}),
    ("modalities", ["text", "audio"]), ("parallel_tool_calls", True), ("user", "u-1"), ("prediction", {}),
    ("service_tier", "auto"), ("store", True), ("metadata", {}), ("reasoning_effort", "low"), ("tempreature", 0.5),
])
def test_unsupported_fields_are_refused_by_name(stack, field, value):
    error = assert_openai_error(chat(stack.http_url, {"model": MODEL, "messages": HI, field: value}), 400)
    assert error["param"] == field and field in error["message"] and error["code"] == "unsupported_parameter"


def test_every_bound_is_checked_before_any_image_is_fetched(stack, tmp_path):
    """17 images that are not even base64: the image count is refused, not the first image."""
    bad = "data:image/png;base64,@@@not-base64@@@"
    body = {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": bad}} for _ in range(17)]}]}
    assert "VLSPLIT_MAX_IMAGES" in assert_openai_error(chat(stack.http_url, body), 400)["message"]
    body = {"model": MODEL, "messages": with_image(bad, "x" * 70000)}
    assert "VLSPLIT_MAX_CHAT_CHARS" in assert_openai_error(chat(stack.http_url, body), 400)["message"]
    body = {"model": MODEL, "messages": with_image(bad), "n": 17}
    assert "VLSPLIT_MAX_CHOICES" in assert_openai_error(chat(stack.http_url, body), 400)["message"]
    body = {"model": MODEL, "messages": with_image(bad), "max_tokens": 5000}
    assert "max_new_tokens" in assert_openai_error(chat(stack.http_url, body), 400)["message"]


def _png(width: int, height: int) -> bytes:
    return make_image(width, height, seed=width)


def _flat(width: int, height: int, colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return buf.getvalue()


def _truncated() -> bytes:
    return _png(64, 64)[:60]


def _huge_dimensions() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buf, format="PNG")  # 400 Mpx, a few hundred KB
    return buf.getvalue()


def hostile_bodies() -> list[tuple[str, object]]:
    """(name, JSON body or raw bytes): each must be a 4xx in OpenAI's shape."""
    ok_part = {"type": "text", "text": "hi"}
    cases: list[tuple[str, object]] = [
        ("not json", b"{bad"), ("truncated json", b'{"model": "qwen2_vl", "messages": ['), ("empty body", b""),
        ("json array", b"[]"), ("json string", b'"hello"'), ("json null", b"null"), ("json number", b"42"),
        ("NaN temperature", b'{"model": "qwen2_vl", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'),
        ("Infinity top_p", b'{"model": "qwen2_vl", "messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}'),
        ("invalid utf-8", b'{"model": "\xff\xfe", "messages": []}'),
        ("no model", {"messages": HI}), ("no messages", {"model": MODEL}), ("empty messages", {"model": MODEL, "messages": []}),
        ("unknown model", {"model": "gpt-4o", "messages": HI}),
    ]
    wrong_types = {"model": [1, None, ["x"]], "messages": ["hi", {"role": "user"}, 3], "n": ["2", 1.5, True, -1, 0],
                   "max_tokens": ["10", 0, -5, 2.5], "temperature": ["0.5", -1, 3, [1]], "top_p": [0, 1.5, "1"],
                   "top_k": [-1, "4"], "seed": [-1, 2**64, "7"], "stop": [5, [1, 2], {"a": 1}],
                   "presence_penalty": [3, "x"], "frequency_penalty": [-3], "repetition_penalty": [0, 5],
                   "logprobs": ["yes", 1], "top_logprobs": [21, -1], "stream": ["true", 1],
                   "stream_options": ["x", {"include_usage": "yes"}, {"other": True}],
                   "response_format": ["json", {"type": "xml"}, {"type": "json_schema"},
                                       {"type": "json_schema", "json_schema": {"schema": "x"}},
                                       {"type": "choice", "choices": []}, {"type": "choice", "choices": [1]}],
                   "guided_choice": [[], "yes", [1]]}
    for field, values in wrong_types.items():
        for value in values:
            body = {"model": MODEL, "messages": HI, field: value}
            if field in ("model", "messages"):
                body = {**{"model": MODEL, "messages": HI}, field: value}
            cases.append((f"{field}={value!r}"[:60], body))
    messages = [
        ("role tool", [{"role": "tool", "content": "x"}]), ("role missing", [{"content": "x"}]),
        ("content number", [{"role": "user", "content": 5}]), ("content null", [{"role": "user", "content": None}]),
        ("part without type", [{"role": "user", "content": [{"text": "x"}]}]),
        ("part type audio", [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]),
        ("text part without text", [{"role": "user", "content": [{"type": "text"}]}]),
        ("image part without url", [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        ("image_url a string", [{"role": "user", "content": [{"type": "image_url", "image_url": "data:x"}]}]),
        ("detail high", [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": data_url(_png(32, 32)), "detail": "high"}}]}]),
        ("message name", [{"role": "user", "content": "x", "name": "bob"}]),
        ("image in system message", [{"role": "system", "content": [
            {"type": "image_url", "image_url": {"url": data_url(_png(32, 32))}}]}]),
        ("empty text only", [{"role": "user", "content": []}]),
    ]
    cases += [(name, {"model": MODEL, "messages": m}) for name, m in messages]
    images = [("bad base64", "data:image/png;base64,@@@"), ("not base64 data url", "data:image/png,rawbytes"),
              ("no comma", "data:image/png;base64"), ("not an image", data_url(b"hello, not an image")),
              ("empty image", "data:image/png;base64,"), ("truncated png", data_url(_truncated())),
              ("huge dimensions", data_url(_huge_dimensions())), ("ftp url", "ftp://example.com/x.png"),
              ("file url", "file:///etc/passwd"), ("remote off", "https://example.com/cat.png"),
              ("bad image id", "vlsplit://not-a-hash"), ("unknown image id", "vlsplit://" + "0" * 64),
              ("ipv4 in ipv6", "https://[::ffff:127.0.0.1]/x.png"), ("nat64", "https://[64:ff9b::a00:1]/x.png")]
    cases += [(f"image: {name}", {"model": MODEL, "messages": with_image(url)}) for name, url in images]
    cases.append(("part list extra", {"model": MODEL, "messages": [{"role": "user", "content": [{**ok_part, "x": 1}]}]}))
    return cases


def test_hostile_http_sweep_is_all_4xx_and_the_server_still_answers(stack):
    cases = hostile_bodies()
    assert len(cases) >= 60
    by_status: collections.Counter = collections.Counter()
    failed = []
    for name, body in cases:
        response = chat(stack.http_url, content=body) if isinstance(body, bytes) else chat(stack.http_url, body)
        by_status[response.status_code] += 1
        try:
            assert_openai_error(response)
        except (AssertionError, ValueError, KeyError) as exc:
            failed.append((name, response.status_code, str(exc)[:200]))
    for path, body in (("/classify", {"image": 5}), ("/classify", {"image": "x", "checks": []}),
                       ("/classify", {"image": "x", "checks": [{"question": "q", "labels": []}]}),
                       ("/classify", {"image": "x", "checks": [{"question": "q", "labels": ["a"], "extra": 1}]})):
        response = httpx.post(stack.http_url + path, json=body, timeout=30)
        by_status[response.status_code] += 1
        try:
            assert_openai_error(response, 400)
        except (AssertionError, ValueError, KeyError) as exc:
            failed.append((path, response.status_code, str(exc)[:200]))
    sent = len(cases) + 4
    print(f"\nhostile HTTP: sent {sent}, refused with a 4xx in OpenAI's shape {sent - len(failed)}, "
          f"failed {len(failed)}; by status {dict(sorted(by_status.items()))}")
    assert not failed, failed
    good = chat(stack.http_url, {"model": MODEL, "messages": with_image(data_url(_png(64, 48))), "max_tokens": 3})
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] >= 1


def test_page_is_served_with_a_strict_content_security_policy(stack):
    response = httpx.get(stack.http_url.removesuffix("/v1") + "/", timeout=10)
    assert response.status_code == 200
    policy = dict(part.strip().split(" ", 1) for part in response.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'" and policy["frame-ancestors"] == "'none'"
    assert "unsafe-inline" not in response.headers["content-security-policy"]
    assert "'sha256-" in policy["script-src"] and policy["connect-src"] == "'self'"
    assert response.headers["x-content-type-options"] == "nosniff"


@pytest.fixture(scope="module")
def tight(tiny_models, tmp_path_factory):
    """A stack whose decoder takes one small image's payload per request (40 kB: a 280x280 image is
    100 tokens x 64 values x 4 bytes + envelope ~ 30 kB) and whose gateway takes 300 kB of images."""
    s = Stack(tiny_models["qwen2_vl"], tmp_path_factory.mktemp("tight"), memory_cache=True,
              decoder_env={"VLSPLIT_MAX_PAYLOAD_BYTES": "40000"},
              gateway_env={"VLSPLIT_MAX_REQUEST_IMAGE_BYTES": "300000"}).start()
    yield s
    s.stop()


def test_payloads_over_the_decoders_limit_are_refused_before_encoding(stack, tight):
    one = chat(tight.http_url, {"model": MODEL, "messages": with_image(data_url(_png(280, 280))), "max_tokens": 2})
    assert one.status_code == 200, one.text
    encodes = tight.encode_requests()
    content = [{"type": "image_url", "image_url": {"url": data_url(_flat(280, 280, (i, 90, 200)))}}
               for i in range(4)]  # a few hundred bytes each: within every byte limit, not the payload one
    body = {"model": MODEL, "messages": [{"role": "user", "content": [*content, {"type": "text", "text": "?"}]}]}
    error = assert_openai_error(chat(tight.http_url, body), 400)
    assert "VLSPLIT_MAX_PAYLOAD_BYTES" in error["message"] and "40000" in error["message"], error
    assert tight.encode_requests() == encodes  # the tower never ran for it


def test_the_request_image_byte_budget_is_named(stack, tight):
    content = [{"type": "image_url", "image_url": {"url": data_url(make_image(300, 300, seed=950 + i))}}
               for i in range(3)]  # ~270 kB each as PNG noise
    body = {"model": MODEL, "messages": [{"role": "user", "content": [*content, {"type": "text", "text": "?"}]}]}
    assert "VLSPLIT_MAX_REQUEST_IMAGE_BYTES" in assert_openai_error(chat(tight.http_url, body), 400)["message"]
