"""Video clips: split == monolithic (greedy token ids, fp32, all three families), and one clip asked
many questions is encoded once (real processes, two decoder replicas sharing one cache)."""

from __future__ import annotations

import dataclasses
import hashlib
from functools import lru_cache

import grpc
import pytest

from clips import make_clip
from conftest import make_image
from procs import Service
from reference import reference_tokens
from services.llm_decoder.engine import DecoderEngine, GenerationInput
from services.vision_encoder.engine import VisionEngine
from shared.images import load_image
from shared.payload import VideoTiming
from shared.sampling import SamplingParams
from shared.video import VideoLimits
from stack import Stack
from vlsplit.v1 import common_pb2, gateway_pb2

QUESTION = "What happens in this clip?"
TOKENS = 12


@lru_cache(maxsize=None)
def engines(path: str) -> tuple[VisionEngine, DecoderEngine]:
    return VisionEngine(path), DecoderEngine(path)


def clip_inputs(path: str, seconds: float = 3.0, fps: float = 1.5, seed: int = 0, **clip):
    encoder, _ = engines(path)
    data = make_clip(seconds, fps=10, seed=seed, **clip)
    return encoder.video.preprocess(data, encoder.video.sampling(VideoLimits(), fps=fps))


def split_tokens(path: str, messages: list[dict], items: list, max_new_tokens: int = TOKENS) -> list[int]:
    """Our tokens for `messages`, whose image/video parts take `items` (PIL images or VideoInputs) in order."""
    encoder, decoder = engines(path)
    inputs = [encoder.preprocessor(i) if hasattr(i, "convert") else i for i in items]
    # named by content, as the services name them: unnamed payloads are never reused
    payloads = [p.named(hashlib.sha256(i.pixel_values.numpy().tobytes()).hexdigest())
                for p, i in zip(encoder.encode_inputs(inputs), inputs)]
    request = GenerationInput(messages, payloads, SamplingParams(max_new_tokens=max_new_tokens))
    return [e.token_id for e in decoder.generate(request) if e.token_id is not None]


def user(*parts, text: str = QUESTION) -> dict:
    return {"role": "user", "content": [{"type": p} for p in parts] + [{"type": "text", "text": text}]}


def test_clip_and_question_equal_monolithic(tiny_model):
    clip = clip_inputs(tiny_model)
    messages = [user("video")]
    ours = split_tokens(tiny_model, messages, [clip])
    assert len(ours) > 0
    assert ours == reference_tokens(tiny_model, [], messages, TOKENS, videos=[clip])


def test_clip_and_image_in_one_turn_equal_monolithic(tiny_model):
    clip, image = clip_inputs(tiny_model, seed=1), load_image(make_image(200, 150, seed=2))
    messages = [user("image", "video", text="Is the picture a frame of the clip?")]
    ours = split_tokens(tiny_model, messages, [image, clip])
    assert ours == reference_tokens(tiny_model, [image], messages, TOKENS, videos=[clip])


def test_second_turn_about_the_clip_prefills_only_its_new_tokens(tiny_model):
    clip = clip_inputs(tiny_model, seed=3)
    _, decoder = engines(tiny_model)
    first = [user("video")]
    answer = split_tokens(tiny_model, first, [clip])
    text = decoder.prompts.decode(answer)
    second = first + [{"role": "assistant", "content": text}, user(text="And then?")]
    before = decoder.prefilled_tokens
    ours = split_tokens(tiny_model, second, [clip])
    prefilled = decoder.prefilled_tokens - before
    clip_tokens = clip.pixel_values.shape[0] // 4
    assert prefilled < 40 < clip_tokens  # the clip and the first turn came from the prefix cache
    assert ours == reference_tokens(tiny_model, [], second, TOKENS, videos=[clip])


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_the_oracle_depends_on_the_clip_timing(tiny_models, family):
    """Guards the oracle: Qwen2.5-VL's temporal spacing and Qwen3-VL's timestamp text change the answer,
    so equal tokens above mean the timing went through, not that it was ignored."""
    path = tiny_models[family]
    clip = clip_inputs(path, seconds=4.0, fps=2.0, seed=4)
    t = clip.grid_thw[0]
    shifted = dataclasses.replace(clip, video=VideoTiming(clip.video.second_per_grid_t * 7,
                                                          tuple(s * 7 + 3 for s in clip.video.timestamps)))
    assert t >= 2
    messages = [user("video")]
    assert split_tokens(path, messages, [clip], 16) != split_tokens(path, messages, [shifted], 16)


def test_a_clip_whose_embeddings_are_an_image_is_refused(tiny_model):
    encoder, decoder = engines(tiny_model)
    image = encoder.encode([load_image(make_image(100, 100))])[0]
    with pytest.raises(Exception, match="is a clip, but its embeddings are an image"):
        list(decoder.generate(GenerationInput([user("video")], [image], SamplingParams(max_new_tokens=2))))


# --- services: one clip, ten questions, two decoder replicas --------------------------------------


def video_ask(stub, clip: bytes | str, question: str, **params) -> gateway_pb2.Answer:
    ref = gateway_pb2.ImageRef(image_id=clip) if isinstance(clip, str) else gateway_pb2.ImageRef(data=clip)
    ref.video.CopyFrom(common_pb2.VideoParams(**params))
    return stub.Ask(gateway_pb2.AskRequest(image=ref, question=question,
                                           sampling=common_pb2.SamplingParams(max_new_tokens=8)), timeout=120)


@pytest.fixture(scope="module")
def two_replicas(shared_stacks, tmp_path_factory):
    """Gateway A -> decoder A (the shared qwen2_vl stack) and gateway B -> decoder B, one encoder and one
    Redis between them."""
    logs = tmp_path_factory.mktemp("video-logs")
    stack = shared_stacks("qwen2_vl")
    decoder_b = stack.start_decoder(stack.model)
    gateway_b = Service("gateway", "--encoder", stack.encoder.address, "--decoder", decoder_b.address,
                        "--redis", stack.url, log_dir=logs).start()
    channel = grpc.insecure_channel(gateway_b.address, options=[("grpc.max_send_message_length", 64 << 20)])
    from vlsplit.v1 import gateway_pb2_grpc

    yield stack, decoder_b, gateway_pb2_grpc.GatewayStub(channel)
    channel.close()
    gateway_b.kill()
    decoder_b.kill()


def test_ten_questions_about_one_clip_run_the_tower_once_across_two_replicas(two_replicas):
    stack, decoder_b, stub_b = two_replicas
    clip = make_clip(3.0, fps=10, seed=5)
    encodes = stack.encodes()
    generates = {d: d.metric("vlsplit_requests_total", method="Generate") for d in (stack.decoder, decoder_b)}
    answers = [video_ask(stack.stub if i % 2 == 0 else stub_b, clip, f"Question {i}: what moves?", fps=1.5)
               for i in range(10)]
    assert stack.encodes() == encodes + 1  # one tower run for all ten
    assert answers[0].cache == gateway_pb2.CACHE_STATUS_MISS
    assert all(a.cache == gateway_pb2.CACHE_STATUS_HIT for a in answers[1:])
    assert len({a.image_id for a in answers}) == 1
    for decoder in (stack.decoder, decoder_b):  # both replicas answered
        assert decoder.metric("vlsplit_requests_total", method="Generate") - generates[decoder] >= 5


def test_the_same_clip_at_another_fps_is_another_entry(two_replicas):
    stack, _, _ = two_replicas
    clip = make_clip(3.0, fps=10, seed=6)
    encodes = stack.encodes()
    one = video_ask(stack.stub, clip, QUESTION, fps=1.5)
    other = video_ask(stack.stub, clip, QUESTION, fps=3)
    again = video_ask(stack.stub, one.image_id, QUESTION, fps=3)
    assert stack.encodes() == encodes + 2
    assert one.image_id == other.image_id == again.image_id  # the content id clients see
    assert other.usage.image_tokens > one.usage.image_tokens
    assert again.cache == gateway_pb2.CACHE_STATUS_HIT and list(again.token_ids) == list(other.token_ids)


def test_grpc_ask_equals_monolithic_and_upload_by_id(two_replicas):
    stack, _, _ = two_replicas
    data = make_clip(3.0, fps=10, seed=7)
    uploaded = stack.stub.UploadImage(gateway_pb2.UploadImageRequest(data=data, video=True), timeout=60)
    assert uploaded.frames == 30 and abs(uploaded.duration_s - 3.0) < 1e-6
    assert (uploaded.width, uploaded.height) == (64, 48)
    answer = video_ask(stack.stub, uploaded.image_id, QUESTION, fps=1.5)
    encoder = VisionEngine(stack.model)
    clip = encoder.video.preprocess(data, encoder.video.sampling(VideoLimits(), fps=1.5))
    assert list(answer.token_ids) == reference_tokens(stack.model, [], [user("video")], 8, videos=[clip])


def test_moderate_and_ask_many_over_a_clip(two_replicas):
    stack, _, _ = two_replicas
    ref = gateway_pb2.ImageRef(data=make_clip(2.0, fps=8, seed=8), video=common_pb2.VideoParams(fps=2))
    many = stack.stub.AskMany(gateway_pb2.AskManyRequest(image=ref, questions=["What moves?", "Which colour?"],
                                                         sampling=common_pb2.SamplingParams(max_new_tokens=6)),
                              timeout=120)
    assert len(many.answers) == 2 and all(a.token_ids for a in many.answers)
    checks = [gateway_pb2.ModerationCheck(question="Is it violent?", labels=["yes", "no"]),
              gateway_pb2.ModerationCheck(question="Is it safe?", labels=["yes", "no"])]
    ref = gateway_pb2.ImageRef(image_id=many.answers[0].image_id, video=common_pb2.VideoParams(fps=2))
    moderated = stack.stub.Moderate(gateway_pb2.ModerateRequest(image=ref, checks=checks), timeout=120)
    assert [len(r.labels) for r in moderated.results] == [2, 2]
    assert all(r.cache == gateway_pb2.CACHE_STATUS_HIT for r in moderated.results)


def test_a_corrupt_clip_is_invalid_argument_and_the_stack_keeps_serving(two_replicas):
    stack, _, _ = two_replicas
    with pytest.raises(grpc.RpcError) as err:
        video_ask(stack.stub, b"\x00\x00\x00\x18ftypmp42" + b"\x13" * 500, QUESTION)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "video" in err.value.details()
    assert video_ask(stack.stub, make_clip(2.0, fps=8, seed=9), QUESTION, fps=2).token_ids


def test_a_clip_over_the_decoders_context_is_refused_before_the_tower_runs(tiny_models, tmp_path):
    stack = Stack(tiny_models["qwen2_vl"], tmp_path, decoder_env={"VLSPLIT_MAX_MODEL_LEN": "200"}).start()
    try:
        with pytest.raises(grpc.RpcError) as err:
            video_ask(stack.stub, make_clip(3.0, fps=10, seed=10), QUESTION, fps=1.5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "the limit is 200 (the decoder's context, VLSPLIT_MAX_MODEL_LEN" in err.value.details()
        assert stack.encodes() == 0
        small = video_ask(stack.stub, make_clip(2.0, fps=8, seed=10), QUESTION, fps=2, min_pixels=3136,
                          max_pixels=12544)
        assert small.token_ids and stack.encodes() == 1
    finally:
        stack.stop()


def test_grpc_chat_with_an_image_and_a_clip_equals_monolithic(two_replicas):
    stack, _, _ = two_replicas
    data, picture = make_clip(2.0, fps=8, seed=11), make_image(160, 120, seed=12)
    params = common_pb2.VideoParams(fps=2)
    turn = gateway_pb2.ChatTurn(role="user", content=[
        gateway_pb2.ChatTurnPart(image=gateway_pb2.ImageRef(data=picture)),
        gateway_pb2.ChatTurnPart(image=gateway_pb2.ImageRef(data=data, video=params)),
        gateway_pb2.ChatTurnPart(text="Is the picture in the clip?")])
    reply = stack.stub.Chat(gateway_pb2.ChatRequest(messages=[turn], sampling=common_pb2.SamplingParams(
        max_new_tokens=8)), timeout=120)
    encoder = VisionEngine(stack.model)
    clip = encoder.video.preprocess(data, encoder.video.sampling(VideoLimits(), fps=2))
    messages = [user("image", "video", text="Is the picture in the clip?")]
    assert list(reply.choices[0].token_ids) == reference_tokens(stack.model, [load_image(picture)], messages, 8,
                                                                videos=[clip])
    assert len(reply.image_ids) == 2
