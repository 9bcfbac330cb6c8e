"""The OpenAI-compatible HTTP API, driven by the official `openai` client against a real stack: texts
equal the gRPC answers for the same requests; streaming, n, logprobs and response formats; OpenAI
error shapes; auth with the gRPC tokens; remote image URLs refused unless public https."""

from __future__ import annotations

import base64
import json

import httpx
import jsonschema
import openai
import pytest

from conftest import make_image
from procs import Service
from test_encoder_service import wait_for
from shared.credentials import new_token
from services.launcher import free_port
from vlsplit.v1 import common_pb2, gateway_pb2

pytestmark = pytest.mark.parametrize("stack", ["qwen2_vl"], indirect=True)

MODEL = "qwen2_vl"
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["verdict", "confidence"],
          "properties": {"verdict": {"enum": ["safe", "unsafe"]},
                         "confidence": {"type": "integer", "minimum": 0, "maximum": 9}}}


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def question(url: str, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


@pytest.fixture
def client(stack) -> openai.OpenAI:
    with openai.OpenAI(base_url=stack.http_url, api_key="unused", max_retries=0) as c:
        yield c


def grpc_chat(stack, image: gateway_pb2.ImageRef, text: str, n: int = 0, **sampling) -> gateway_pb2.ChatResponse:
    turn = gateway_pb2.ChatTurn(role="user", content=[gateway_pb2.ChatTurnPart(image=image),
                                                      gateway_pb2.ChatTurnPart(text=text)])
    return stack.stub.Chat(gateway_pb2.ChatRequest(messages=[turn], n=n, sampling=common_pb2.SamplingParams(**sampling)),
                           timeout=120)


def test_models_lists_the_served_model(stack, client):
    assert [m.id for m in client.models.list()] == [MODEL]


def test_chat_with_data_url_equals_grpc_ask_and_chat(stack, client):
    data = make_image(200, 150, seed=51)
    reply = client.chat.completions.create(model=MODEL, messages=question(data_url(data), "What is this?"),
                                           max_tokens=12)
    answer = stack.ask(data, "What is this?", max_new_tokens=12)
    assert reply.choices[0].message.content == answer.text
    assert reply.model_extra["vlsplit"]["token_ids"] == [list(answer.token_ids)]
    assert reply.usage.completion_tokens == len(answer.token_ids)
    assert reply.model_extra["vlsplit"]["image_ids"] == [answer.image_id]
    chat = grpc_chat(stack, gateway_pb2.ImageRef(data=data), "What is this?", max_new_tokens=12)
    assert reply.choices[0].message.content == chat.choices[0].text


def test_streaming_with_uploaded_image_id_equals_unary(stack, client):
    data = make_image(190, 170, seed=52)
    uploaded = httpx.post(stack.http_url + "/images", content=data, headers={"Content-Type": "image/png"}).json()
    assert uploaded["url"] == "vlsplit://" + uploaded["id"]
    messages = question(uploaded["url"], "Describe it.")
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}))
    unary = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == unary.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == unary.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == unary.usage.completion_tokens
    assert unary.model_extra["vlsplit"]["cache"] == "hit"  # the upload stored bytes; the stream encoded them


def test_n_with_seed_is_reproducible_and_equals_grpc(stack, client):
    data = make_image(160, 160, seed=53)
    kwargs = dict(model=MODEL, messages=question(data_url(data), "Tell me a story."), max_tokens=10, n=3,
                  temperature=1.0, seed=5)
    first, second = client.chat.completions.create(**kwargs), client.chat.completions.create(**kwargs)
    texts = [c.message.content for c in first.choices]
    assert len(set(texts)) == 3 and texts == [c.message.content for c in second.choices]
    chat = grpc_chat(stack, gateway_pb2.ImageRef(data=data), "Tell me a story.", n=3, max_new_tokens=10,
                     temperature=1.0, seed=5)
    assert texts == [c.text for c in chat.choices]


def test_logprobs_cover_every_token_with_sorted_alternatives(client):
    data = make_image(150, 150, seed=54)
    reply = client.chat.completions.create(model=MODEL, messages=question(data_url(data), "Hi"), max_tokens=8,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and entry.logprob <= tops[0] + 1e-6
        assert entry.top_logprobs[0].token == entry.token  # greedy takes the most likely token
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace") == reply.choices[0].message.content


def test_response_format_json_schema_and_choices(client):
    url = data_url(make_image(170, 130, seed=55))
    reply = client.chat.completions.create(
        model=MODEL, messages=question(url, "Is this image safe? Answer in JSON."), max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
    choices = ["safe", "unsafe", "unsure"]
    for extra in ({"guided_choice": choices}, {"response_format": {"type": "choice", "choices": choices}}):
        reply = client.chat.completions.create(model=MODEL, messages=question(url, "Is it safe?"), max_tokens=8,
                                               temperature=1.0, seed=3, extra_body=extra)
        assert reply.choices[0].message.content in choices


def test_errors_have_openai_shapes(stack, client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=question("data:image/png;base64,AAAA", "x"))
    assert err.value.body["type"] == "invalid_request_error" and "not an image" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert "qwen2_vl" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=17)
    assert "VLSPLIT_MAX_CHOICES" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=-1)
    assert "temperature" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:  # remote URLs are off by default
        client.chat.completions.create(model=MODEL, messages=question("https://example.com/cat.png", "x"))
    assert "VLSPLIT_REMOTE_IMAGES" in err.value.body["message"]
    assert stack.gateway.health() == 1


def test_classify_endpoint_scores_every_check(stack):
    url = data_url(make_image(120, 120, seed=56))
    body = {"image": url, "checks": [{"question": "Is there a dog?", "labels": ["yes", "no"]},
                                     {"question": "Is it safe?", "labels": ["safe", "unsafe", "unsure"]}]}
    results = httpx.post(stack.http_url + "/classify", json=body, timeout=60).json()["results"]
    assert [sorted(x["label"] for x in r["labels"]) for r in results] == [["no", "yes"], ["safe", "unsafe", "unsure"]]
    assert all(abs(sum(x["prob"] for x in r["labels"]) - 1) < 1e-6 for r in results)


@pytest.fixture(scope="module")
def guarded(stack, tmp_path_factory):
    """A second gateway on the same encoder and decoder: tokens on, remote URLs on, a 1 MiB body limit."""
    token, line = new_token("app", "ask")
    path = tmp_path_factory.mktemp("http-auth") / "tokens"
    path.write_text(line + "\n")
    port = free_port()
    gateway = Service("gateway", "--encoder", stack.encoder.address, "--decoder", stack.decoder.address,
                      "--redis", stack.url, "--http-port", str(port), log_dir=path.parent,
                      env={"VLSPLIT_AUTH_TOKENS": str(path), "VLSPLIT_REMOTE_IMAGES": "true",
                           "VLSPLIT_MAX_HTTP_BODY_BYTES": str(1 << 20)}).start()
    yield f"http://127.0.0.1:{port}/v1", token
    gateway.kill()


def test_tokens_are_required_and_scoped_over_http(guarded):
    base_url, token = guarded
    with pytest.raises(openai.AuthenticationError) as err:
        openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
    assert err.value.status_code == 401 and err.value.body["type"] == "authentication_error"
    with openai.OpenAI(base_url=base_url, api_key=token, max_retries=0) as client:
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert reply.usage.completion_tokens >= 1
    denied = httpx.post(base_url + "/images", content=b"x", headers={"Authorization": f"Bearer {token}"})
    assert denied.status_code == 403 and "upload" in denied.json()["error"]["message"]


def test_oversized_request_is_413(guarded):
    base_url, token = guarded
    with openai.OpenAI(base_url=base_url, api_key=token, max_retries=0) as client:
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model=MODEL, messages=question(data_url(b"\0" * (2 << 20)), "x"))
    assert err.value.status_code == 413 and "VLSPLIT_MAX_HTTP_BODY_BYTES" in err.value.body["message"]


@pytest.mark.parametrize("url, reason", [
    ("http://127.0.0.1/cat.png", "must be https"),
    ("https://127.0.0.1/cat.png", "not a public address"),
    ("https://10.0.0.8/cat.png", "not a public address"),
    ("https://192.168.1.20/cat.png", "not a public address"),
    ("https://169.254.169.254/latest/meta-data", "not a public address"),
    ("https://[::1]/cat.png", "not a public address"),
    ("https://localhost/cat.png", "not a public address"),
])
def test_remote_urls_to_private_addresses_are_refused(guarded, url, reason):
    base_url, token = guarded
    with openai.OpenAI(base_url=base_url, api_key=token, max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL, messages=question(url, "x"))
    assert reason in err.value.body["message"]


def test_client_leaving_a_stream_cancels_its_generation(stack):
    data = make_image(140, 140, seed=57)
    cancelled = stack.decoder.metric("vlsplit_decoder_cancelled_total")
    body = {"model": MODEL, "messages": question(data_url(data), "Tell me everything."), "max_tokens": 2000,
            "stream": True}
    with httpx.stream("POST", stack.http_url + "/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        next(response.iter_lines())  # the first token arrived; then the client hangs up
    wait_for(lambda: stack.decoder.metric("vlsplit_decoder_cancelled_total") > cancelled)
    assert stack.gateway.health() == 1
