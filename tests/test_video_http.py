"""Video clips over the HTTP API, the SDK, the CLI and the web page, against a real stack: a `video_url`
part (data: URL or an uploaded `vlsplit://` id) gives the same token ids as the gRPC Ask and Chat for the
same clip and sampling; `POST /v1/videos` answers the clip's frames and length; the SDK detects clips
by suffix (a .gif stays an image unless marked); `vlsplit ask clip.mp4 ...` prints the JSON lines images
get; corrupt and over-limit clips are 400s naming the problem; remote clip URLs have the image URLs'
guards; the page shows a dropped clip's first frame and frame count. Clips are tiny (2 s, 64x48, 4 fps)
and sampled at 1 fps with min_frames 2 (2 frames, one temporal patch), so prompts stay short."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import socket
import subprocess
import sys

import httpx
import openai
import pytest

import vlsplit
from clips import make_audio_only, make_clip
from conftest import make_image
from procs import Service
from services.gateway.remote import ImageUrls
from shared.errors import InvalidRequest, TooLarge
from shared.image_ids import VideoParams
from services.launcher import free_port
from vlsplit.sdk import Upload, Video, image_ref, upload_request
from vlsplit.v1 import common_pb2, gateway_pb2

STACK = pytest.mark.parametrize("stack", ["qwen2_vl"], indirect=True)
MODEL = "qwen2_vl"
SAMPLING = {"fps": 1.0, "min_frames": 2}  # 2 of the 8 frames (the model's default min_frames is 4)
QUESTION = "What happens in this video?"


def clip(seed: int, fmt: str = "mp4") -> bytes:
    return make_clip(seconds=2, width=64, height=48, fps=4, fmt=fmt, seed=seed)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def data_url(data: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def video_question(url: str, text: str = QUESTION, **sampling) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url, **sampling}},
                                         {"type": "text", "text": text}]}]


def video_ref(source: bytes | str, sampling: dict | None = None) -> gateway_pb2.ImageRef:
    ref = gateway_pb2.ImageRef(image_id=source) if isinstance(source, str) else gateway_pb2.ImageRef(data=source)
    ref.video.CopyFrom(common_pb2.VideoParams(**(SAMPLING if sampling is None else sampling)))
    return ref


def grpc_ask(stack, source: bytes | str, text: str = QUESTION, max_new_tokens: int = 10, sampling: dict | None = None):
    return stack.stub.Ask(gateway_pb2.AskRequest(image=video_ref(source, sampling), question=text,
                                                 sampling=common_pb2.SamplingParams(max_new_tokens=max_new_tokens)),
                          timeout=120)


def grpc_chat(stack, source: bytes | str, text: str = QUESTION, max_new_tokens: int = 10) -> gateway_pb2.ChatResponse:
    turn = gateway_pb2.ChatTurn(role="user", content=[gateway_pb2.ChatTurnPart(image=video_ref(source)),
                                                      gateway_pb2.ChatTurnPart(text=text)])
    return stack.stub.Chat(gateway_pb2.ChatRequest(messages=[turn], sampling=common_pb2.SamplingParams(
        max_new_tokens=max_new_tokens)), timeout=120)


def upload(base_url: str, data: bytes, **kwargs) -> httpx.Response:
    return httpx.post(base_url + "/videos", content=data, headers={"Content-Type": "video/mp4"}, timeout=60, **kwargs)


@pytest.fixture
def client(stack) -> openai.OpenAI:
    with openai.OpenAI(base_url=stack.http_url, api_key="unused", max_retries=0) as c:
        yield c


# ---- the OpenAI API -----------------------------------------------------------------------------------


@STACK
def test_video_url_data_url_equals_grpc_ask_and_chat(stack, client):
    data = clip(seed=1)
    reply = client.chat.completions.create(model=MODEL, messages=video_question(data_url(data), **SAMPLING),
                                           max_tokens=10)
    answer = grpc_ask(stack, data)
    assert reply.model_extra["vlsplit"]["token_ids"] == [list(answer.token_ids)]
    assert reply.choices[0].message.content == answer.text
    assert reply.model_extra["vlsplit"]["image_ids"] == [sha(data)] == [answer.image_id]
    assert reply.usage.prompt_tokens == answer.usage.prompt_tokens
    chat = grpc_chat(stack, data)
    assert reply.model_extra["vlsplit"]["token_ids"] == [list(chat.choices[0].token_ids)]


@STACK
def test_an_image_and_a_clip_in_one_turn_equal_grpc_chat(stack, client):
    image, data = make_image(96, 80, seed=12), clip(seed=12)
    content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()}},
               {"type": "video_url", "video_url": {"url": data_url(data), **SAMPLING}},
               {"type": "text", "text": "Compare them."}]
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=10)
    assert reply.model_extra["vlsplit"]["image_ids"] == [sha(image), sha(data)]
    turn = gateway_pb2.ChatTurn(role="user", content=[gateway_pb2.ChatTurnPart(image=gateway_pb2.ImageRef(data=image)),
                                                      gateway_pb2.ChatTurnPart(image=video_ref(data)),
                                                      gateway_pb2.ChatTurnPart(text="Compare them.")])
    chat = stack.stub.Chat(gateway_pb2.ChatRequest(messages=[turn], sampling=common_pb2.SamplingParams(
        max_new_tokens=10)), timeout=120)
    assert reply.model_extra["vlsplit"]["token_ids"] == [list(chat.choices[0].token_ids)]
    assert reply.usage.prompt_tokens == chat.usage.prompt_tokens


@STACK
def test_uploaded_clip_id_equals_grpc_and_streams(stack, client):
    data = clip(seed=2)
    response = upload(stack.http_url, data)
    assert response.status_code == 200, response.text
    uploaded = response.json()
    assert uploaded["id"] == sha(data) and uploaded["url"] == "vlsplit://" + sha(data)
    assert uploaded["object"] == "video" and uploaded["expires_in"] > 0
    assert (uploaded["frames"], uploaded["duration_s"], uploaded["width"], uploaded["height"]) == (8, 2.0, 64, 48)
    messages = video_question(uploaded["url"], **SAMPLING)
    unary = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10)
    assert unary.model_extra["vlsplit"]["cache"] == "miss"  # the upload stored bytes; this encoded them
    answer = grpc_ask(stack, uploaded["id"])
    assert unary.model_extra["vlsplit"]["token_ids"] == [list(answer.token_ids)]
    assert answer.cache == gateway_pb2.CACHE_STATUS_HIT
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == unary.choices[0].message.content
    assert chunks[-1].model_extra["vlsplit"]["cache"] == "hit"


@STACK
def test_sampling_fields_are_honoured(stack, client):
    """fps 2 samples 4 of the 8 frames (two temporal patches), more tokens than 2 frames at fps 1; max_frames
    caps it back to 2; the same clip sampled otherwise is another cache entry."""
    url = data_url(clip(seed=3))
    one = client.chat.completions.create(model=MODEL, messages=video_question(url, **SAMPLING), max_tokens=2)
    two = client.chat.completions.create(model=MODEL, messages=video_question(url, fps=2), max_tokens=2)
    capped = client.chat.completions.create(model=MODEL, messages=video_question(url, fps=2, min_frames=2,
                                                                                  max_frames=2), max_tokens=2)
    clip_tokens = two.usage.prompt_tokens - one.usage.prompt_tokens
    assert clip_tokens > 0 and capped.usage.prompt_tokens == one.usage.prompt_tokens
    assert two.model_extra["vlsplit"]["cache"] == "miss"


@STACK
def test_classify_endpoint_takes_a_clip(stack):
    data = clip(seed=4)
    body = {"video": {"url": data_url(data), **SAMPLING},
            "checks": [{"question": "Is something moving?", "labels": ["yes", "no"]}]}
    response = httpx.post(stack.http_url + "/classify", json=body, timeout=60)
    assert response.status_code == 200, response.text
    [result] = response.json()["results"]
    assert result["image_id"] == sha(data) and abs(sum(x["prob"] for x in result["labels"]) - 1) < 1e-6
    raw = stack.stub.Classify(gateway_pb2.ClassifyRequest(image=video_ref(data), question="Is something moving?",
                                                          labels=["yes", "no"]), timeout=60)
    assert [x["label"] for x in result["labels"]] == [s.label for s in raw.labels]
    both = httpx.post(stack.http_url + "/classify", json={**body, "image": data_url(data)}, timeout=60)
    assert both.status_code == 400 and "exactly one of image" in both.json()["error"]["message"]


def _error(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


def _chat(base_url: str, messages: list[dict], **extra) -> httpx.Response:
    return httpx.post(base_url + "/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 2,
                                                            **extra}, timeout=60)


@STACK
def test_corrupt_clips_are_400s_naming_the_problem(stack):
    good = clip(seed=5)
    cases = [(data_url(b"these bytes are not a video at all"), "not a readable video"),
             (data_url(good[: len(good) // 3]), "video"),  # truncated
             (data_url(make_audio_only()), "no video stream"),
             (data_url(b""), "video bytes are empty"),
             ("data:video/mp4;base64,@@@", "not valid base64"),
             ("data:video/mp4,raw", "must be base64"),
             ("vlsplit://not-a-hash", "64 lowercase hex"),
             ("ftp://example.com/clip.mp4", "video_url must be a data: URL"),
             ("https://example.com/clip.mp4", "VLSPLIT_REMOTE_IMAGES")]
    for url, reason in cases:
        error = _error(_chat(stack.http_url, video_question(url, **SAMPLING)))
        assert reason in error["message"] and error["type"] == "invalid_request_error", (url[:40], error)
    unknown = _chat(stack.http_url, video_question("vlsplit://" + "0" * 64, **SAMPLING))
    assert unknown.status_code == 404, unknown.text
    error = _error(_chat(stack.http_url, video_question(data_url(good), fps=100)))
    assert "VLSPLIT_MAX_VIDEO_FPS" in error["message"], error
    error = _error(_chat(stack.http_url, [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(good)}}, {"type": "text", "text": "x"}]}]))
    assert "video_url part" in error["message"], error
    for body in (b"not a video", good[:500], make_audio_only(), b""):
        error = _error(upload(stack.http_url, body))
        assert "video" in error["message"], error
    assert stack.gateway.health() == 1


@STACK
def test_video_url_fields_are_validated_strictly(stack):
    url = data_url(clip(seed=5))
    error = _error(_chat(stack.http_url, video_question(url, frame_rate=2)))
    assert error["code"] == "unsupported_parameter" and error["param"] == "messages.0.content.0.video_url.frame_rate"
    for field, value in (("fps", "2"), ("fps", -1), ("max_frames", 1.5), ("min_frames", -2), ("max_pixels", "big")):
        error = _error(_chat(stack.http_url, video_question(url, **{field: value})))
        assert error["param"] == f"messages.0.content.0.video_url.{field}", (field, value, error)
    schema = httpx.get(stack.http_url.removesuffix("/v1") + "/openapi.json", timeout=10).json()
    assert "/v1/videos" in schema["paths"] and "VideoUrl" in schema["components"]["schemas"]


@pytest.fixture(scope="module")
def limited(stack, tmp_path_factory):
    """A second gateway on the same encoder and decoder: clips up to 8000 bytes, remote URLs on."""
    port = free_port()
    gateway = Service("gateway", "--encoder", stack.encoder.address, "--decoder", stack.decoder.address,
                      "--redis", stack.url, "--http-port", str(port), log_dir=tmp_path_factory.mktemp("video-limits"),
                      env={"VLSPLIT_MAX_VIDEO_BYTES": "8000", "VLSPLIT_REMOTE_IMAGES": "true"}).start()
    yield f"http://127.0.0.1:{port}/v1", gateway
    gateway.kill()


@STACK
def test_over_limit_clips_are_400s_naming_the_limit(stack, limited):
    base_url, gateway = limited
    big = clip(seed=6)
    assert len(big) > 8000
    error = _error(_chat(base_url, video_question(data_url(big), **SAMPLING)))
    assert "VLSPLIT_MAX_VIDEO_BYTES" in error["message"] and "8000" in error["message"], error
    error = _error(upload(base_url, big))  # refused from its Content-Length, before it is read
    assert "VLSPLIT_MAX_VIDEO_BYTES" in error["message"], error
    chunked = httpx.post(base_url + "/videos", content=iter([big[:6000], big[6000:]]), timeout=60)
    assert "VLSPLIT_MAX_VIDEO_BYTES" in _error(chunked)["message"]  # no Content-Length: counted as it arrives
    small = make_clip(seconds=1, width=16, height=16, fps=2, fmt="mp4")
    assert len(small) <= 8000
    response = upload(base_url, small)
    assert response.status_code == 200 and response.json()["frames"] == 2, response.text
    assert gateway.health() == 1


@STACK
@pytest.mark.parametrize("url, reason", [
    ("http://127.0.0.1/clip.mp4", "must be https"),
    ("https://127.0.0.1/clip.mp4", "not a public address"),
    ("https://169.254.169.254/latest/meta-data", "not a public address"),
    ("https://[::ffff:10.0.0.8]/clip.mp4", "embeds 10.0.0.8"),
    ("https://localhost/clip.mp4", "not a public address"),
])
def test_remote_clip_urls_have_the_image_guards(limited, url, reason):
    base_url, _ = limited
    assert reason in _error(_chat(base_url, video_question(url, **SAMPLING)))["message"]


def test_remote_clip_fetch_is_bounded_by_the_video_limit(monkeypatch):
    public = ("93.184.216.34",)
    monkeypatch.setattr(socket, "getaddrinfo",
                        lambda host, port, *a, **k: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (*public, port))])
    bodies = {"/small": b"v" * 3000, "/big": b"v" * 6000}
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=bodies[request.url.path]))
    urls = ImageUrls(1000, remote=True, timeout_s=5, transport=transport, max_video_bytes=5000)
    ref = asyncio.run(urls.image_ref("https://clips.example/small", VideoParams(fps=2)))
    assert ref.data == bodies["/small"] and ref.HasField("video") and ref.video.fps == 2
    with pytest.raises(TooLarge, match="VLSPLIT_MAX_VIDEO_BYTES"):
        asyncio.run(urls.image_ref("https://clips.example/big", VideoParams()))
    with pytest.raises(TooLarge, match="VLSPLIT_MAX_IMAGE_BYTES"):  # the same bytes as an image: the image bound
        asyncio.run(urls.image_ref("https://clips.example/small"))
    with pytest.raises(InvalidRequest, match="video_url part"):
        asyncio.run(urls.image_ref(data_url(b"x")))


# ---- the SDK ------------------------------------------------------------------------------------------


def test_sdk_marks_clips_by_suffix_video_or_upload(tmp_path):
    paths = {name: tmp_path / name for name in ("a.mp4", "b.MOV", "c.webm", "d.mkv", "e.avi", "f.gif", "g.png")}
    for path in paths.values():
        path.write_bytes(b"x")
    assert [image_ref(p).HasField("video") for p in paths.values()] == [True] * 5 + [False, False]
    assert image_ref(Video(paths["f.gif"])).HasField("video")  # a .gif is a clip only when marked
    ref = image_ref(Video("ab" * 32, fps=2, max_frames=8))
    assert (ref.image_id, ref.video.fps, ref.video.max_frames, ref.video.min_frames) == ("ab" * 32, 2, 8, 0)
    assert not image_ref(b"bytes").HasField("video") and not image_ref("ab" * 32).HasField("video")
    assert image_ref(Upload("ab" * 32, video=True)).HasField("video")  # an uploaded clip's id stays a clip
    assert [upload_request(paths[n], None).video for n in ("a.mp4", "f.gif")] == [True, False]
    assert upload_request(paths["f.gif"], True).video and not upload_request(paths["a.mp4"], False).video
    with pytest.raises(TypeError):
        upload_request(Video("ab" * 32), None)


@STACK
def test_sdk_upload_ask_and_chat_round_trip(stack, tmp_path):
    data = clip(seed=7)
    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    raw = grpc_ask(stack, data)
    with vlsplit.Client(stack.gateway.address) as client:
        uploaded = client.upload(path)
        assert isinstance(uploaded, Upload) and uploaded == uploaded.id == raw.image_id
        assert (uploaded.video, uploaded.frames, uploaded.duration_s, uploaded.width, uploaded.height) == \
            (True, 8, 2.0, 64, 48)
        for source in (Video(uploaded, **SAMPLING), Video(path, **SAMPLING), Video(data, **SAMPLING)):
            answer = client.ask(source, QUESTION, max_new_tokens=10)
            assert answer.token_ids == list(raw.token_ids) and answer.image_id == raw.image_id
        chat = client.chat([{"role": "user", "content": [{"type": "video", "video": uploaded, **SAMPLING}, QUESTION]}],
                           max_new_tokens=10)
        assert chat.choices[0].token_ids == list(raw.token_ids) and chat.image_ids == [raw.image_id]
        default = client.ask(uploaded, QUESTION, max_new_tokens=4)  # the model's default sampling (2 fps)
        assert default.prompt_tokens > raw.usage.prompt_tokens
        gif = tmp_path / "clip.gif"
        gif.write_bytes(clip(seed=7, fmt="gif"))
        as_image = client.upload(gif)
        assert not as_image.video and as_image.frames == 0 and (as_image.width, as_image.height) == (64, 48)
        assert client.upload(gif, video=True).frames == 8

    async def run() -> None:
        async with vlsplit.AsyncClient(stack.gateway.address) as aclient:
            again = await aclient.upload(data, video=True)
            assert again == raw.image_id and again.frames == 8
            answer = await aclient.ask(Video(again, **SAMPLING), QUESTION, max_new_tokens=10)
            assert answer.token_ids == list(raw.token_ids)

    asyncio.run(run())


# ---- the CLI ------------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlsplit.cli", *args], capture_output=True, text=True, timeout=120)


@STACK
def test_cli_ask_about_a_clip_prints_the_image_json_lines(stack, tmp_path):
    data = clip(seed=8)
    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    questions = [QUESTION, "Is it day or night?"]
    result = _cli("ask", str(path), *questions, "--fps", "1", "--min-frames", "2", "--max-new-tokens", "10", "--json",
                  "--gateway", stack.gateway.address)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [x["question"] for x in lines] == questions and {x["image_id"] for x in lines} == {sha(data)}
    assert [x["cache"] for x in lines] == ["miss", "hit"]  # the second question sent only the clip's id
    assert set(lines[0]) == {"question", "text", "token_ids", "image_id", "cache", "finish_reason", "encode_ms",
                             "ttft_ms", "total_ms", "prompt_tokens", "completion_tokens"}
    for line in lines:
        assert line["token_ids"] == list(grpc_ask(stack, data, line["question"]).token_ids)
    by_id = _cli("ask", "--image-id", sha(data), "--video", "--fps", "1", "--min-frames", "2", QUESTION,
                 "--max-new-tokens", "10", "--json", "--gateway", stack.gateway.address)
    assert by_id.returncode == 0, by_id.stderr
    assert json.loads(by_id.stdout)["token_ids"] == lines[0]["token_ids"]
    labels = _cli("classify", str(path), "Is something moving?", "--labels", "yes,no", "--json", "--fps", "1",
                  "--min-frames", "2", "--gateway", stack.gateway.address)
    assert labels.returncode == 0, labels.stderr
    assert json.loads(labels.stdout)["image_id"] == sha(data) and json.loads(labels.stdout)["cache"] == "hit"
    chat = subprocess.run([sys.executable, "-m", "vlsplit.cli", "chat", str(path), "--fps", "1", "--min-frames", "2",
                           "--max-new-tokens", "10", "--gateway", stack.gateway.address], input=QUESTION + "\n",
                          capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0 and "[hit]" in chat.stdout, chat.stdout + chat.stderr  # the clip's id, uploaded once
    assert lines[0]["text"] in chat.stdout
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video")
    failed = _cli("ask", str(bad), QUESTION, "--gateway", stack.gateway.address)
    assert failed.returncode == 1 and "not a readable video" in failed.stderr


# ---- the web page -------------------------------------------------------------------------------------


DROP = """async ([b64, name, type]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const transfer = new DataTransfer();
  transfer.items.add(new File([bytes], name, {type}));
  document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true,
                                                                       cancelable: true}));
}"""


@STACK
def test_page_shows_a_dropped_clips_first_frame_and_frame_count(stack, tmp_path):
    from test_web import open_page

    data = clip(seed=9, fmt="webm")
    with open_page(stack) as (_, page):
        page.evaluate(DROP, [base64.b64encode(data).decode(), "clip.webm", "video/webm"])
        page.wait_for_function("() => !document.getElementById('ask').disabled")  # uploaded
        assert "8 frames" in page.inner_text("#clip-info") and "2.0 s" in page.inner_text("#clip-info")
        page.wait_for_function("() => document.getElementById('preview').src.startsWith('data:image/png')")
        assert page.locator("#preview").is_visible()  # the first frame, drawn from a <video> in the page
        assert page.evaluate("document.getElementById('preview').naturalWidth") == 64
        assert page.locator("#fps-box").is_visible()
        page.fill("#fps", "1")
        page.fill("#max-tokens", "10")
        page.fill("#question", QUESTION)
        page.click("#ask")
        page.wait_for_function("() => document.querySelectorAll('.answer .stats .hit, .answer .stats .miss')"
                               ".length === 1")
        text = page.locator(".answer .text").inner_text()
        page.click("#moderate")
        page.wait_for_selector("table.checks")
        assert page.locator("table.checks tr").count() == 3
        page.screenshot(path=str(tmp_path / "clip-page.png"), full_page=True)
        # a clip the browser cannot decode (MPEG-4 Part 2 in .mov): no frame to show, but the gateway takes it
        page.evaluate(DROP, [base64.b64encode(clip(seed=10, fmt="mov")).decode(), "clip.mov", "video/quicktime"])
        page.wait_for_function("() => document.getElementById('clip-info').textContent.includes('8 frames')")
        page.wait_for_function("() => document.getElementById('hint').textContent.includes('cannot show')")
        assert not page.locator("#preview").is_visible() and not page.is_disabled("#ask")
        assert page.evaluate("window.cspViolations") == []
    assert text == grpc_ask(stack, data, sampling={"fps": 1}).text
