"""The Chat RPCs through a whole stack: conversations with a system prompt, several images in one turn
and several turns equal the monolithic model, reuse the images' embeddings and the earlier turns' KV,
and answer n times."""

from __future__ import annotations

import grpc
import pytest

from conftest import make_image
from reference import reference_tokens
from shared.images import load_image
from vlsplit.v1 import common_pb2, gateway_pb2

SYSTEM = "You are a careful assistant. Answer briefly."
QUESTIONS = ["Compare the two pictures.", "Which one is brighter?", "Describe the first one again."]
PREFILL = "vlsplit_decoder_prefill_tokens_total"


def text(role: str, value: str) -> gateway_pb2.ChatTurn:
    return gateway_pb2.ChatTurn(role=role, content=[gateway_pb2.ChatTurnPart(text=value)])


def user(images: list[gateway_pb2.ImageRef], question: str) -> gateway_pb2.ChatTurn:
    parts = [gateway_pb2.ChatTurnPart(image=image) for image in images]
    return gateway_pb2.ChatTurn(role="user", content=parts + [gateway_pb2.ChatTurnPart(text=question)])


def chat(stack, messages, n: int = 0, **sampling) -> gateway_pb2.ChatResponse:
    sampling.setdefault("max_new_tokens", 12)
    return stack.stub.Chat(gateway_pb2.ChatRequest(messages=messages, n=n,
                                                   sampling=common_pb2.SamplingParams(**sampling)), timeout=120)


def test_three_turns_with_system_prompt_and_two_images_equal_monolithic_model(stack):
    data = [make_image(200, 150, seed=41), make_image(150, 210, seed=42)]
    images = [load_image(d) for d in data]
    reference = [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
                 {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                              {"type": "text", "text": QUESTIONS[0]}]}]
    messages = [text("system", SYSTEM), user([gateway_pb2.ImageRef(data=d) for d in data], QUESTIONS[0])]
    replies = []
    for turn, question in enumerate(QUESTIONS):
        if turn:
            answer = replies[-1].choices[0].text
            reference += [{"role": "assistant", "content": [{"type": "text", "text": answer}]},
                          {"role": "user", "content": [{"type": "text", "text": question}]}]
            messages += [text("assistant", answer), text("user", question)]
        prefilled = stack.decoder.metric(PREFILL)
        sent = stack.gateway.metric("vlsplit_gateway_payload_bytes_sent_total")
        replies.append(chat(stack, messages))
        assert list(replies[-1].choices[0].token_ids) == reference_tokens(stack.model, images, reference, 12)
        if turn == 0:  # later turns name the images by id: no bytes re-sent
            messages[1] = user([gateway_pb2.ImageRef(image_id=i) for i in replies[0].image_ids], QUESTIONS[0])
            continue
        assert replies[-1].cache == gateway_pb2.CACHE_STATUS_HIT
        assert stack.gateway.metric("vlsplit_gateway_payload_bytes_sent_total") == sent  # the decoder held them
    # the third turn computes only what the second prompt did not hold: its answer, the new question
    new_tokens = replies[2].usage.prompt_tokens - replies[1].usage.prompt_tokens
    computed = stack.decoder.metric(PREFILL) - prefilled
    assert computed <= new_tokens + 16  # + one partial KV block (16 tokens) that is recomputed
    assert computed < replies[2].usage.prompt_tokens - replies[2].usage.image_tokens


@pytest.mark.parametrize("stack", ["qwen2_vl"], indirect=True)
def test_text_only_conversation_equals_monolithic_model(stack):
    messages = [text("system", SYSTEM), text("user", "Name three colours.")]
    reply = chat(stack, messages)
    reference = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name three colours."}]
    assert list(reply.choices[0].token_ids) == reference_tokens(stack.model, [], reference, 12)
    assert list(reply.image_ids) == []
    assert reply.cache == gateway_pb2.CACHE_STATUS_UNSPECIFIED  # no image: neither a hit nor a miss


@pytest.mark.parametrize("stack", ["qwen2_5_vl"], indirect=True)
def test_stream_equals_unary_and_n_answers_are_seeded(stack):
    image = make_image(180, 140, seed=43)
    messages = [user([gateway_pb2.ImageRef(data=image)], "What do you see?")]
    unary = chat(stack, messages, n=3, temperature=1.0, seed=11)
    assert [c.index for c in unary.choices] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in unary.choices}) == 3  # each answer its own seed
    assert unary.usage.completion_tokens == sum(c.usage.completion_tokens for c in unary.choices)
    again = chat(stack, messages, n=3, temperature=1.0, seed=11)
    assert [list(c.token_ids) for c in again.choices] == [list(c.token_ids) for c in unary.choices]
    request = gateway_pb2.ChatRequest(messages=messages, n=3, sampling=common_pb2.SamplingParams(
        max_new_tokens=12, temperature=1.0, seed=11))
    streamed: dict[int, list[int]] = {0: [], 1: [], 2: []}
    final = None
    for message in stack.stub.ChatStream(request, timeout=120):
        if message.HasField("final"):
            final = message.final
        else:
            streamed[message.index] += message.token_ids
    assert [streamed[i] for i in range(3)] == [list(c.token_ids) for c in unary.choices]
    assert final is not None and [c.text for c in final.choices] == [c.text for c in unary.choices]


@pytest.mark.parametrize("stack", ["qwen2_vl"], indirect=True)
@pytest.mark.parametrize("case, message", [
    ("image in assistant turn", "belong in user messages"),
    ("too many images", "VLSPLIT_MAX_IMAGES"),
    ("n over limit", "VLSPLIT_MAX_CHOICES"),
    ("unknown role", "role must be one of"),
    ("empty message", "has no content"),
])
def test_bad_conversations_are_refused_with_the_reason(stack, case, message):
    image = gateway_pb2.ImageRef(data=make_image(64, 64, seed=44))
    messages, n = [user([image], "Hi")], 0
    if case == "image in assistant turn":
        messages.append(gateway_pb2.ChatTurn(role="assistant", content=[gateway_pb2.ChatTurnPart(image=image)]))
    elif case == "too many images":
        messages = [user([image] * 17, "Hi")]
    elif case == "n over limit":
        n = 17
    elif case == "unknown role":
        messages.append(text("tool", "{}"))
    else:
        messages.append(gateway_pb2.ChatTurn(role="user"))
    with pytest.raises(grpc.RpcError) as err:
        chat(stack, messages, n=n)
    assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert message in err.value.details()
    assert stack.gateway.health() == 1  # still serving
