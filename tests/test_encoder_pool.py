"""The gateway's encoder pool with real processes: encodes spread over two encoders, an encoder
killed mid-encode has its request finished by the other, a draining encoder gets no new work."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import make_image
from procs import Redis, Service
from stack import Stack
from test_encoder_service import wait_for
from services.gateway.routing import rendezvous
from shared.image_ids import image_id

QUESTION = "What is in this picture?"


def start_pool_stack(tiny_models, tmp_path, a_env: dict) -> Stack:
    """Redis, encoders A and B (both may drain for 10 min), a decoder, a gateway over both encoders."""
    import grpc

    from vlsplit.v1 import gateway_pb2_grpc

    stack = Stack(tiny_models["qwen2_vl"], tmp_path)
    stack.redis = Redis().start()
    stack.url = stack.redis.url
    a = Service("encoder", "--model", stack.model, "--redis", stack.url, log_dir=tmp_path,
                env={"VLSPLIT_DRAIN_S": "600", **a_env})
    b = Service("encoder", "--model", stack.model, "--redis", stack.url, log_dir=tmp_path,
                env={"VLSPLIT_DRAIN_S": "600"})
    stack.encoder, stack.encoders = b, (a, b)
    stack.decoder = stack.start_decoder(stack.model, wait=False)
    for service in (a.start(wait=False), b.start(wait=False), stack.decoder):  # the models load side by side
        service.wait_serving()
    stack.gateway = Service("gateway", "--encoder", f"{a.address},{b.address}", "--decoder", stack.decoder.address,
                            "--redis", stack.url, log_dir=tmp_path).start()
    stack.channel = grpc.insecure_channel(stack.gateway.address)
    stack.stub = gateway_pb2_grpc.GatewayStub(stack.channel)
    return stack


@pytest.fixture
def stacks(tiny_models, tmp_path):
    started = []

    def start(a_env: dict) -> Stack:
        started.append(start_pool_stack(tiny_models, tmp_path, a_env))
        return started[-1]

    yield start
    for stack in started:
        stack.encoders[0].kill()
        stack.stop()


def images_first_on(replica: str, replicas: list[str], n: int, seed: int) -> list[bytes]:
    """New images whose rendezvous order puts `replica` first."""
    out, i = [], 0
    while len(out) < n:
        data = make_image(96 + i % 7, 80, seed=seed + i)
        if rendezvous(image_id(data), replicas)[0] == replica:
            out.append(data)
        i += 1
    return out


# Opt-in: by default an encoder SIGKILLed while it holds an encode is failed over under a steady stream
# (tests/test_scaling.py, its third encoder), with no request lost.
@pytest.mark.slow
def test_encoder_killed_mid_encode_is_retried_on_another(stacks):
    s = stacks({"VLSPLIT_ENCODE_MAX_WAIT_MS": "600000"})  # A: a lone image waits 10 min for company
    a, b = s.encoders
    replicas = [a.address, b.address]
    wait_for(lambda: s.gateway.metric("vlsplit_gateway_encoders_serving") == 2)
    [data] = images_first_on(a.address, replicas, 1, seed=500)
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(s.ask, data, QUESTION, 120)
        wait_for(lambda: a.metric("vlsplit_in_flight_requests", method="Encode") >= 1)  # A holds it
        a.proc.send_signal(signal.SIGKILL)
        reply = answer.result()
    assert reply.token_ids and b.metric("vlsplit_encoder_encodes_total") == 1
    assert s.gateway.metric("vlsplit_gateway_encoder_failovers_total") == 1


def test_encodes_spread_and_a_draining_encoder_gets_no_new_work(stacks):
    s = stacks({})
    a, b = s.encoders
    replicas = [a.address, b.address]
    wait_for(lambda: s.gateway.metric("vlsplit_gateway_encoders_serving") == 2)
    # idle replicas tie on requests in flight: the image's rendezvous order decides, spreading images
    for data in images_first_on(a.address, replicas, 2, seed=700) + images_first_on(b.address, replicas, 2, seed=800):
        assert s.ask(data, QUESTION).token_ids
    assert [s.gateway.metric("vlsplit_gateway_encoder_requests_total", replica=r) for r in replicas] == [2, 2]
    assert a.metric("vlsplit_encoder_encodes_total") == b.metric("vlsplit_encoder_encodes_total") == 2

    b.proc.send_signal(signal.SIGTERM)  # B drains: NOT_SERVING, but up (and answering) for 10 min
    wait_for(lambda: s.gateway.metric("vlsplit_gateway_encoders_serving") == 1)
    for data in images_first_on(b.address, replicas, 2, seed=900):  # B's images, had it been serving
        assert s.ask(data, QUESTION).token_ids
    assert b.metric("vlsplit_requests_total", method="Encode") == 2 and a.metric("vlsplit_encoder_encodes_total") == 4
