"""POST /v1/chat/completions/batch (vLLM's shape: `messages` a list of conversations sharing the sampling),
driven by the official `openai` client's raw request helper against the shared qwen2_vl stack: a batch of
questions about one image is AskMany (one decoder request) and answers as gRPC AskMany does; a mixed batch
answers each conversation as gRPC Ask / a single chat completion does; bounds and strictness refuse early."""

from __future__ import annotations

import httpx
import openai
import pytest

from conftest import make_image
from test_openai import data_url, question
from vlsplit.v1 import common_pb2, gateway_pb2

pytestmark = pytest.mark.parametrize("stack", ["qwen2_vl"], indirect=True)

MODEL = "qwen2_vl"


@pytest.fixture
def client(stack) -> openai.OpenAI:
    with openai.OpenAI(base_url=stack.http_url, api_key="unused", max_retries=0) as c:
        yield c


def batch(client: openai.OpenAI, conversations: list[list[dict]], **fields) -> dict:
    reply = client.post("/chat/completions/batch", body={"model": MODEL, "messages": conversations, **fields},
                        cast_to=httpx.Response)
    assert reply.status_code == 200, reply.text
    return reply.json()


def refused(client: openai.OpenAI, body: dict) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        client.post("/chat/completions/batch", body=body, cast_to=httpx.Response)
    error = caught.value.body
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, error
    return caught.value


def test_questions_about_one_image_are_ask_many(stack, client):
    data = make_image(180, 140, seed=61)
    questions = ["What is this?", "Describe the colours.", "Is there text in it?"]
    reply = batch(client, [question(data_url(data), q) for q in questions], max_tokens=10)
    grpc = stack.stub.AskMany(gateway_pb2.AskManyRequest(image=gateway_pb2.ImageRef(data=data), questions=questions,
                                                         sampling=common_pb2.SamplingParams(max_new_tokens=10)),
                              timeout=120)
    assert reply["object"] == "chat.completion" and reply["id"].startswith("chatcmpl-batch-")
    assert reply["vlsplit"]["shared_prefix"] is True
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in reply["choices"]] == [a.text for a in grpc.answers]
    assert reply["vlsplit"]["token_ids"] == [list(a.token_ids) for a in grpc.answers]
    assert reply["vlsplit"]["image_ids"] == [[a.image_id] for a in grpc.answers]
    assert reply["usage"]["completion_tokens"] == sum(len(a.token_ids) for a in grpc.answers)
    assert all(c["finish_reason"] in ("stop", "length") for c in reply["choices"])


def test_mixed_batch_answers_each_conversation_as_alone(stack, client):
    first, second = make_image(160, 150, seed=62), make_image(200, 120, seed=63)
    text_only = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
    conversations = [question(data_url(first), "What is this?"), question(data_url(second), "What is this?"),
                     text_only, question(data_url(first), "What colour dominates?")]
    reply = batch(client, conversations, max_tokens=8)
    assert reply["vlsplit"]["shared_prefix"] is False
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2, 3]
    texts = [c["message"]["content"] for c in reply["choices"]]
    for i, (image, text) in {0: (first, "What is this?"), 1: (second, "What is this?"),
                             3: (first, "What colour dominates?")}.items():
        answer = stack.ask(image, text, max_new_tokens=8)
        assert texts[i] == answer.text and reply["vlsplit"]["token_ids"][i] == list(answer.token_ids)
    alone = client.chat.completions.create(model=MODEL, messages=text_only, max_tokens=8)
    assert texts[2] == alone.choices[0].message.content
    assert reply["vlsplit"]["image_ids"][2] == []


def test_a_batch_over_the_limit_is_refused_naming_the_setting(client):
    error = refused(client, {"model": MODEL, "messages": [[{"role": "user", "content": "hi"}]] * 65})
    assert error.status_code == 400 and "VLSPLIT_MAX_QUESTIONS" in error.body["message"]


def test_strict_body_and_vllm_limits(client):
    one = [[{"role": "user", "content": "hi"}]]
    error = refused(client, {"model": MODEL, "messages": one, "logit_bias": {}})
    assert error.status_code == 400 and error.body["param"] == "logit_bias"
    for field, value in (("n", 2), ("stream", True)):
        error = refused(client, {"model": MODEL, "messages": one, field: value})
        assert error.status_code == 400 and error.body["param"] == field
    error = refused(client, {"model": MODEL, "messages": [[]]})
    assert error.status_code == 400 and error.body["param"].startswith("messages")
    error = refused(client, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert error.status_code == 400  # a conversation, not a message, is each item
    error = refused(client, {"model": "other", "messages": one})
    assert error.status_code == 404 and error.body["code"] == "model_not_found"
