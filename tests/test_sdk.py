"""The Python SDK (`vlsplit.Client`, `vlsplit.AsyncClient`) against real stacks: every call equals the
raw gRPC answer, streams reassemble, retries ride out a decoder restart and honour a rate limit's
retry hint, TLS + token work, and the public module passes mypy --strict."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
import trustme

import vlsplit
from conftest import make_image
from procs import Service
from shared.credentials import new_token
from stack import Stack

ON_QWEN2_VL = pytest.mark.parametrize("stack", ["qwen2_vl"], indirect=True)
ROOT = Path(__file__).resolve().parent.parent


@ON_QWEN2_VL
def test_sync_client_calls_equal_raw_grpc_answers(stack):
    data = make_image(180, 150, seed=61)
    raw = stack.ask(data, "What is this?", max_new_tokens=10)
    with vlsplit.Client(stack.gateway.address) as client:
        image_id = client.upload(data)
        assert image_id == raw.image_id
        answer = client.ask(image_id, "What is this?", max_new_tokens=10)
        assert (answer.text, answer.token_ids, answer.cache_hit) == (raw.text, list(raw.token_ids), True)
        deltas = list(client.ask_stream(Path(_write(data, stack.log_dir / "img.png")), "What is this?",
                                        max_new_tokens=10))
        assert "".join(d.text for d in deltas) == raw.text and deltas[-1].finish_reason in ("stop", "length")
        many = client.ask_many(image_id, ["What is this?", "Is it red?"], max_new_tokens=10)
        assert [a.question for a in many] == ["What is this?", "Is it red?"] and many[0].text == raw.text
        labels = client.classify(image_id, "Is it day?", ["yes", "no"])
        assert sorted(x.label for x in labels.labels) == ["no", "yes"] and labels.top in ("yes", "no")
        checks = client.moderate(image_id, {"Is it safe?": ["safe", "unsafe"], "Any text?": ["yes", "no"]})
        assert [c.question for c in checks] == ["Is it safe?", "Any text?"]
        chat = client.chat([{"role": "user", "content": [{"type": "image", "image": image_id}, "What is this?"]}],
                           max_new_tokens=10)
        assert chat.text == raw.text and chat.image_ids == [raw.image_id]
        streamed = list(client.chat_stream([{"role": "user", "content": [data, "What is this?"]}], n=2,
                                           max_new_tokens=10))
        assert "".join(d.text for d in streamed if d.index == 0) == raw.text
        with pytest.raises(vlsplit.VlsplitError) as err:
            client.ask(b"not an image", "x")
        assert err.value.code.name == "INVALID_ARGUMENT"


@ON_QWEN2_VL
def test_async_client_calls_equal_raw_grpc_answers(stack):
    data = make_image(170, 160, seed=62)
    raw = stack.ask(data, "Describe it.", max_new_tokens=10)

    async def run() -> None:
        async with vlsplit.AsyncClient(stack.gateway.address) as client:
            answers = await asyncio.gather(*(client.ask(data, "Describe it.", max_new_tokens=10) for _ in range(3)))
            assert {a.text for a in answers} == {raw.text}
            text = "".join([d.text async for d in client.ask_stream(raw.image_id, "Describe it.", max_new_tokens=10)])
            assert text == raw.text
            chat = await client.chat([{"role": "user", "content": [data, "Describe it."]}], max_new_tokens=10)
            assert chat.text == raw.text
            deltas = [d async for d in client.chat_stream([{"role": "user", "content": [data, "Describe it."]}],
                                                         max_new_tokens=10)]
            assert "".join(d.text for d in deltas) == raw.text
            assert (await client.classify(raw.image_id, "Is it day?", ["yes", "no"])).image_id == raw.image_id

    asyncio.run(run())


def _write(data: bytes, path: Path) -> Path:
    path.write_bytes(data)
    return path


def test_retries_ride_out_a_decoder_restart(tiny_models, tmp_path):
    s = Stack(tiny_models["qwen2_vl"], tmp_path).start()
    try:
        data = make_image(150, 150, seed=63)
        expected = s.ask(data, "Hi", max_new_tokens=6)
        old = s.decoder
        old.kill()
        s.decoder = s.start_decoder(s.model, old.port, wait=False)  # loading: the gateway answers UNAVAILABLE
        with vlsplit.Client(s.gateway.address, retry=vlsplit.Retry(attempts=30, initial_s=0.2, max_s=1.0)) as client:
            answer = client.ask(data, "Hi", max_new_tokens=6)
        assert answer.token_ids == list(expected.token_ids)
        assert s.gateway.metric("vlsplit_requests_total", method="Ask", code="UNAVAILABLE") >= 1  # it did retry
    finally:
        s.stop()


@ON_QWEN2_VL
def test_tls_token_and_rate_limit_retry_hint(stack, tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem.bytes())
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    (tmp_path / "cert.pem").write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
    token, line = new_token("sdk", "*")
    (tmp_path / "tokens").write_text(line + ":1\n")  # one request a second
    gateway = Service("gateway", "--encoder", stack.encoder.address, "--decoder", stack.decoder.address,
                      "--redis", stack.url, tls=True, log_dir=tmp_path,
                      env={"VLSPLIT_TLS_CERT": str(tmp_path / "cert.pem"), "VLSPLIT_TLS_KEY": str(tmp_path / "key.pem"),
                           "VLSPLIT_AUTH_TOKENS": str(tmp_path / "tokens")}).start()
    try:
        with vlsplit.Client(gateway.address, tls_ca=tmp_path / "ca.pem", tls_server_name="localhost",
                            retry=vlsplit.Retry(attempts=1)) as client:
            with pytest.raises(vlsplit.VlsplitError) as err:
                client.upload(make_image(64, 64, seed=64))
            assert err.value.code.name == "UNAUTHENTICATED"
        with vlsplit.Client(gateway.address, token=token, tls_ca=tmp_path / "ca.pem", tls_server_name="localhost",
                            retry=vlsplit.Retry(attempts=4, initial_s=0.01, max_s=0.02)) as client:
            answers = [client.ask(make_image(64, 64, seed=64), "Hi", max_new_tokens=4) for _ in range(3)]
        assert len({a.text for a in answers}) == 1
        # the 2nd and 3rd call were over the rate: refused, then retried after the server's hint (~1 s),
        # which is longer than this client's own backoff (<= 0.02 s): without the hint 4 attempts would not do
        assert gateway.metric("vlsplit_requests_total", method="Ask", code="RESOURCE_EXHAUSTED") >= 2
    finally:
        gateway.kill()


def test_public_module_passes_mypy_strict():
    result = subprocess.run([sys.executable, "-m", "mypy", "--strict", "vlsplit/sdk.py", "vlsplit/__init__.py"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (ROOT / "vlsplit" / "py.typed").is_file()
