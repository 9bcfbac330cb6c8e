"""Client authentication at the gateway, with real processes: tokens, scopes, revocation, rate limits,
image quotas, and images scoped to the client that sent them (another client's image id is NOT_FOUND
and sending the same bytes tells nothing: a miss, a fresh encode)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from conftest import make_image
from procs import Redis, Service
from reference import reference_tokens
from shared.credentials import new_token
from shared.images import load_image
from stack import ask_request
from vlsplit.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

SAMPLE = Path(__file__).resolve().parent.parent / "docs" / "sample.png"
CLIENTS = {  # name -> (scopes, requests_per_s, images_per_day); "" = the gateway's default
    "alice": ("*", "", ""), "bob": ("*", "", ""), "reader": ("classify", "", ""),
    "slow": ("*", "0.5", ""), "thrifty": ("*", "", "2"), "revoked": ("*", "", ""), "pace": ("*", "4", ""),
}


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> tuple[dict[str, str], dict[str, str], Path]:
    made = {name: new_token(name, scopes) for name, (scopes, _, _) in CLIENTS.items()}
    lines = {}
    for name, (_, line) in made.items():
        _, rate, images = CLIENTS[name]
        lines[name] = line + (f":{rate}:{images}" if rate or images else "")
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text("# test clients\n" + "\n".join(lines.values()) + "\n")
    return {name: token for name, (token, _) in made.items()}, lines, path


@pytest.fixture(scope="module")
def stack(tiny_models, tokens, tmp_path_factory):
    _, _, path = tokens
    log_dir = tmp_path_factory.mktemp("auth-logs")
    model = tiny_models["qwen2_vl"]
    redis = Redis().start()
    encoder = Service("encoder", "--model", model, "--redis", redis.url, log_dir=log_dir).start(wait=False)
    decoder = Service("decoder", "--model", model, log_dir=log_dir).start(wait=False)
    encoder.wait_serving(), decoder.wait_serving()  # the models load side by side
    gateway = Service("gateway", "--encoder", encoder.address, "--decoder", decoder.address, "--redis", redis.url,
                      env={"VLSPLIT_AUTH_TOKENS": str(path)}, log_dir=log_dir).start()
    channel = grpc.insecure_channel(gateway.address, options=[("grpc.max_send_message_length", 64 << 20)])
    yield {"model": model, "encoder": encoder, "decoder": decoder, "gateway": gateway, "redis": redis,
           "stub": gateway_pb2_grpc.GatewayStub(channel), "log_dir": log_dir}
    channel.close()
    for service in (gateway, decoder, encoder):
        service.kill()
    redis.stop()


def call(stub, method: str, request, token: str | None = None):
    """The reply, or (code name, details, trailing metadata) of the error."""
    metadata = [("authorization", f"Bearer {token}")] if token else []
    try:
        return getattr(stub, method)(request, metadata=metadata, timeout=60)
    except grpc.RpcError as exc:
        return exc.code().name, exc.details(), dict(exc.trailing_metadata() or ())


def code(result) -> str:
    return result[0] if isinstance(result, tuple) else "OK"


def test_tokens_and_scopes(stack, tokens):
    token, _, _ = tokens
    stub = stack["stub"]
    image = SAMPLE.read_bytes()
    assert code(call(stub, "Ask", ask_request(image, "What is this?"))) == "UNAUTHENTICATED"
    assert code(call(stub, "Ask", ask_request(image, "What is this?"), "vls_not-a-token")) == "UNAUTHENTICATED"
    denied = call(stub, "Ask", ask_request(image, "What is this?"), token["reader"])
    assert code(denied) == "PERMISSION_DENIED" and "'ask' scope" in denied[1]
    classify = gateway_pb2.ClassifyRequest(image=gateway_pb2.ImageRef(data=image), question="Is it day?",
                                           labels=["yes", "no"])
    assert code(call(stub, "Classify", classify, token["reader"])) == "OK"
    answer = call(stub, "Ask", ask_request(image, "What is this?", max_new_tokens=6), token["alice"])
    assert list(answer.token_ids) == reference_tokens(stack["model"], [load_image(image)], "What is this?", 6)
    # health stays open for probes
    assert stack["gateway"].health() == 1  # SERVING
    gateway = stack["gateway"]
    assert gateway.metric("vlsplit_gateway_client_requests_total", client="alice", method="Ask") >= 1
    assert gateway.metric("vlsplit_gateway_client_rejected_total", client="reader", reason="scope") == 1
    log = gateway.tail(10_000)
    assert all(t not in log for t in token.values())  # the token never reaches a log, only its name


def test_cli_sends_the_token_from_the_environment(stack, tokens):
    token, _, _ = tokens
    base = [sys.executable, "-m", "vlsplit.cli", "ask", str(SAMPLE), "hi", "--json", "--max-new-tokens", "2",
            "--gateway", stack["gateway"].address]
    without = subprocess.run(base, capture_output=True, text=True, env={**os.environ, "VLSPLIT_TOKEN": ""})
    assert without.returncode == 1 and "UNAUTHENTICATED" in without.stderr
    with_env = subprocess.run(base, capture_output=True, text=True, env={**os.environ, "VLSPLIT_TOKEN": token["bob"]})
    assert with_env.returncode == 0, with_env.stderr
    assert json.loads(with_env.stdout)["token_ids"]


def test_rate_limit_answers_resource_exhausted_with_a_retry_hint(stack, tokens):
    token, _, _ = tokens
    stub = stack["stub"]
    empty = ask_request(b"x", " ")  # rejected by validation: cheap, but it is a call and counts
    assert code(call(stub, "Ask", empty, token["slow"])) == "INVALID_ARGUMENT"
    limited = call(stub, "Ask", empty, token["slow"])
    assert code(limited) == "RESOURCE_EXHAUSTED" and "0.5 requests/s" in limited[1]
    assert 0 < int(limited[2]["retry-after-ms"]) <= 2000
    assert stack["gateway"].metric("vlsplit_gateway_client_rejected_total", client="slow", reason="rate") == 1


def test_image_quota_per_day(stack, tokens):
    token, _, _ = tokens
    stub = stack["stub"]
    ids = []
    for seed in (1, 2):
        reply = call(stub, "UploadImage", gateway_pb2.UploadImageRequest(data=make_image(40, 40, seed=seed)),
                     token["thrifty"])
        assert code(reply) == "OK"
        ids.append(reply.image_id)
    over = call(stub, "UploadImage", gateway_pb2.UploadImageRequest(data=make_image(40, 40, seed=3)),
                token["thrifty"])
    assert code(over) == "RESOURCE_EXHAUSTED" and "quota of 2 images per day" in over[1]
    seconds_to_midnight = 86400 - time.time() % 86400
    assert abs(int(over[2]["retry-after-ms"]) / 1000 - seconds_to_midnight) < 120
    # asking about an image already sent costs no quota
    assert code(call(stub, "Ask", ask_request(ids[0], "What is this?", max_new_tokens=2), token["thrifty"])) == "OK"


def test_images_are_scoped_to_the_client_that_sent_them(stack, tokens):
    token, _, _ = tokens
    stub, encoder = stack["stub"], stack["encoder"]
    image = make_image(72, 64, seed=4242)
    encodes = encoder.metric("vlsplit_encoder_encodes_total")
    first = call(stub, "Ask", ask_request(image, "Describe it.", max_new_tokens=6), token["alice"])
    assert first.cache == gateway_pb2.CACHE_STATUS_MISS
    again = call(stub, "Ask", ask_request(first.image_id, "Describe it.", max_new_tokens=6), token["alice"])
    assert again.cache == gateway_pb2.CACHE_STATUS_HIT
    # bob holds alice's image id: it is unknown to him, exactly like an id nobody sent
    stolen = call(stub, "Ask", ask_request(first.image_id, "Describe it."), token["bob"])
    unknown = call(stub, "Ask", ask_request("0" * 64, "Describe it."), token["bob"])
    assert code(stolen) == code(unknown) == "NOT_FOUND"
    assert stolen[1].replace(first.image_id, "ID") == unknown[1].replace("0" * 64, "ID")
    # bob sends the same bytes: a miss and a fresh encode of his own, the same answer
    own = call(stub, "Ask", ask_request(image, "Describe it.", max_new_tokens=6), token["bob"])
    assert own.cache == gateway_pb2.CACHE_STATUS_MISS and own.image_id == first.image_id
    assert list(own.token_ids) == list(first.token_ids)
    assert encoder.metric("vlsplit_encoder_encodes_total") == encodes + 2


def test_revoked_token_is_refused_without_a_restart(stack, tokens):
    token, lines, path = tokens
    stub = stack["stub"]
    request = ask_request(b"x", " ")
    assert code(call(stub, "Ask", request, token["revoked"])) == "INVALID_ARGUMENT"  # admitted
    path.write_text("\n".join(line for name, line in lines.items() if name != "revoked") + "\n")
    deadline = time.monotonic() + 30
    while code(call(stub, "Ask", request, token["revoked"])) != "UNAUTHENTICATED":  # reloaded within a second
        assert time.monotonic() < deadline, "the token file was not reloaded"
    assert code(call(stub, "Ask", request, token["alice"])) == "INVALID_ARGUMENT"  # others unaffected


def test_global_scope_shares_images_and_prefixes_between_clients(stack, tokens):
    token, _, path = tokens
    gateway = Service("gateway", "--encoder", stack["encoder"].address, "--decoder", stack["decoder"].address,
                      "--redis", stack["redis"].url, log_dir=stack["log_dir"],
                      env={"VLSPLIT_AUTH_TOKENS": str(path), "VLSPLIT_CACHE_SCOPE": "global"}).start()
    try:
        with grpc.insecure_channel(gateway.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            image = make_image(64, 72, seed=777)
            first = call(stub, "Ask", ask_request(image, "What is this?", max_new_tokens=2), token["alice"])
            shared = call(stub, "Ask", ask_request(first.image_id, "What is this?", max_new_tokens=2), token["bob"])
            assert code(shared) == "OK" and shared.cache == gateway_pb2.CACHE_STATUS_HIT
            # and the decoder's prefix cache: bob reuses the KV of alice's system prompt
            system = "Shared instructions for everyone. " + " ".join(f"Point {i} applies." for i in range(40))
            assert code(call(stub, "Chat", _chat(system, "One?"), token["alice"])) == "OK"
            before = _hit_tokens(stack["decoder"])
            assert code(call(stub, "Chat", _chat(system, "Two?"), token["bob"])) == "OK"
            assert _hit_tokens(stack["decoder"]) - before >= 200
    finally:
        gateway.kill()


def _chat(system: str, question: str) -> gateway_pb2.ChatRequest:
    turn = lambda role, text: gateway_pb2.ChatTurn(role=role, content=[gateway_pb2.ChatTurnPart(text=text)])  # noqa: E731
    return gateway_pb2.ChatRequest(messages=[turn("system", system), turn("user", question)],
                                   sampling=common_pb2.SamplingParams(max_new_tokens=2))


def _hit_tokens(decoder) -> float:
    return decoder.metric("vlsplit_kv_cache_hit_tokens_total")


def test_tenants_share_no_prefix_in_the_decoder(stack, tokens):
    """CACHE_SCOPE=tenant reaches the decoder's prefix cache: bob sending alice's long system prompt
    reuses none of its KV (he prefills all of it, so its timing tells him nothing), alice's next
    question reuses it."""
    token, _, _ = tokens
    stub, decoder = stack["stub"], stack["decoder"]
    system = "You are the moderation assistant of tenant A. " + " ".join(f"Rule {i}: be careful." for i in range(40))
    assert code(call(stub, "Chat", _chat(system, "First question?"), token["alice"])) == "OK"
    before = _hit_tokens(decoder)
    assert code(call(stub, "Chat", _chat(system, "Second question?"), token["bob"])) == "OK"
    # nothing of alice's ~280 tokens was reused for bob (at most the template's opening tokens that his own
    # earlier prompts share with it: "<|im_start|>system\nYou are")
    assert _hit_tokens(decoder) - before < 16
    assert code(call(stub, "Chat", _chat(system, "Third question?"), token["alice"])) == "OK"
    assert _hit_tokens(decoder) - before >= 200  # alice's own system prompt: reused (>= 200 of its ~280 tokens)
    assert code(call(stub, "Chat", _chat(system, "Fourth question?"), token["bob"])) == "OK"
    assert _hit_tokens(decoder) - before >= 400  # and bob's own, from his first request


# ---- start-up warnings, bounded metric labels, rates shared across replicas --------------------


def test_start_warns_about_clients_without_an_image_quota(stack):
    """The default images_per_day (0 = unlimited) lets any client flush the cache: the gateway says so."""
    log = stack["gateway"].tail(10_000)
    unbounded = len(CLIENTS) - sum(1 for _, _, images in CLIENTS.values() if images)
    assert f"{unbounded} of {len(CLIENTS)} clients have no images_per_day quota" in log
    assert "VLSPLIT_AUTH_IMAGES_PER_DAY" in log


def test_per_client_and_per_replica_labels_are_bounded(monkeypatch, tmp_path):
    """Past VLSPLIT_METRICS_LABEL_LIMIT names a client's calls count as "other"; a replica that leaves
    DNS has its series retired and frees its slot."""
    import asyncio

    from services.gateway import auth
    from services.gateway.routing import DECODER_REQUESTS, Router

    made = {name: new_token(name) for name in ("c1", "c2", "c3", "c4")}
    path = tmp_path / "tokens"
    path.write_text("\n".join(line for _, line in made.values()) + "\n")
    interceptor = auth.AuthInterceptor(auth.TokenFile(str(path), 0.0, 0))
    monkeypatch.setattr(auth.REQUESTS, "limit", 2)
    monkeypatch.setattr(auth.REQUESTS, "_kept", set())

    async def admit_all():
        for token, _ in made.values():
            await interceptor.authenticate(f"Bearer {token}", "Ask")

    asyncio.run(admit_all())
    series = {labels[0]: child._value.get() for labels, child in auth.REQUESTS.metric._metrics.items()
              if labels[1] == "Ask" and labels[0] in ("c1", "c2", "c3", "c4", "other")}
    assert series["c1"] >= 1 and series["c2"] >= 1 and "c3" not in series and "c4" not in series
    assert series["other"] >= 2

    addresses = [["10.0.0.1", "10.0.0.2"], ["10.0.0.1", "10.0.0.3"]]

    async def resolve(host, port):
        return addresses.pop(0)

    monkeypatch.setattr(DECODER_REQUESTS, "limit", 2)
    monkeypatch.setattr(DECODER_REQUESTS, "_kept", set())
    router = Router("decoders.test:50053", 5.0, resolve=resolve, metric=DECODER_REQUESTS)

    async def churn():
        await router.refresh()
        for replica in router.replicas:
            DECODER_REQUESTS.labels(replica).inc()
        await router.refresh()  # 10.0.0.2 leaves, 10.0.0.3 arrives: it gets the freed slot
        for replica in router.replicas:
            DECODER_REQUESTS.labels(replica).inc()

    asyncio.run(churn())
    replicas = {labels[0] for labels in DECODER_REQUESTS.metric._metrics}
    assert {"10.0.0.1:50053", "10.0.0.3:50053"} <= replicas and "10.0.0.2:50053" not in replicas
    assert "other" not in replicas


def _admitted_in(stubs, token: str, seconds: float) -> tuple[int, list[int], float, set[str]]:
    """Cheap calls (refused by validation once admitted) as fast as possible, alternating between the
    gateways: (admitted in total, admitted per gateway, seconds from the first call, codes seen)."""
    request = ask_request(b"x", " ")
    per = [0] * len(stubs)
    codes = set()
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < seconds:
        result = code(call(stubs[n % len(stubs)], "Ask", request, token))
        codes.add(result)
        if result != "RESOURCE_EXHAUSTED":
            per[n % len(stubs)] += 1
        n += 1
    return sum(per), per, time.monotonic() - start, codes


def test_cluster_rate_scope_shares_a_clients_rate_across_gateways(stack, tokens, tmp_path):
    """AUTH_RATE_SCOPE=cluster: two gateways sharing a Redis admit the client's 4 requests/s in total (one
    bucket: its burst of 4 plus 4 a second), not twice that. Redis gone: each limits alone (never fails
    open, never UNAVAILABLE), counted and logged; Redis back: shared again."""
    token, _, path = tokens
    redis = Redis().start()
    env = {"VLSPLIT_AUTH_TOKENS": str(path), "VLSPLIT_AUTH_RATE_SCOPE": "cluster"}
    gateways = [Service("gateway", "--encoder", stack["encoder"].address, "--decoder", stack["decoder"].address,
                        "--redis", redis.url, env=env, log_dir=tmp_path) for _ in range(2)]
    channels = []
    try:
        for gateway in gateways:
            gateway.start(wait=False)
        for gateway in gateways:
            gateway.wait_serving()
        channels = [grpc.insecure_channel(g.address) for g in gateways]
        stubs = [gateway_pb2_grpc.GatewayStub(c) for c in channels]
        admitted, per, elapsed, codes = _admitted_in(stubs, token["pace"], 3.0)
        print(f"cluster scope: admitted {admitted} (per gateway {per}) in {elapsed:.2f} s at 4/s")
        assert codes == {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}
        assert min(per) >= 3  # both gateways admitted some
        assert 4 * elapsed - 1 <= admitted <= 4 + 4 * elapsed + 2  # one bucket; two would admit ~2x

        redis.stop()
        admitted, per, elapsed, codes = _admitted_in(stubs, token["pace"], 1.5)
        print(f"Redis down: admitted {admitted} (per gateway {per}) in {elapsed:.2f} s")
        assert codes <= {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"} and "RESOURCE_EXHAUSTED" in codes
        assert admitted <= 2 * (4 + 4 * elapsed) + 2  # each replica's own bucket: limited, not open
        for gateway in gateways:
            assert gateway.metric("vlsplit_gateway_rate_limit_fallbacks_total") >= 1
            assert "shared rate limiter's Redis failed" in gateway.tail(100_000)

        redis = Redis(redis.port).start()
        time.sleep(1.0)  # the bucket refills; the next calls reach Redis again
        _admitted_in(stubs, token["pace"], 0.5)
        for gateway in gateways:
            assert "rates are cluster-wide again" in gateway.tail(100_000)
    finally:
        for channel in channels:
            channel.close()
        for gateway in gateways:
            gateway.kill()
        redis.stop()
