"""Bounds a client cannot push past, on a real encoder process: its queue of images waiting for the
vision tower (admission control, like the decoder's) and the calls a server handles at once."""

from __future__ import annotations

import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import make_image
from procs import Service, running
from test_encoder_service import wait_for
from vlsplit.v1 import common_pb2, vision_encoder_pb2, vision_encoder_pb2_grpc


def test_encoder_queue_and_concurrent_rpcs_are_bounded(tiny_models, tmp_path):
    # a batch that never closes: every image the tower gets waits, so the queue fills and stays full
    env = {"VLSPLIT_ENCODE_MAX_WAIT_MS": "600000", "VLSPLIT_ENCODE_MAX_BATCH": "64", "VLSPLIT_ENCODE_MAX_QUEUE": "2",
           "VLSPLIT_MAX_CONCURRENT_RPCS": "4"}
    encoder = Service("encoder", "--model", tiny_models["qwen2_vl"], "--redis", "memory", env=env, log_dir=tmp_path)
    with running(encoder), grpc.insecure_channel(encoder.address) as channel:
        stub = vision_encoder_pb2_grpc.VisionEncoderStub(channel)
        waiting = [stub.Encode(vision_encoder_pb2.EncodeRequest(image=make_image(48, 48, seed=i)), timeout=120)
                   for i in range(2)]
        started = [threading.Thread(target=_first_reply, args=(call,), daemon=True) for call in waiting]
        for thread in started:
            thread.start()
        wait_for(lambda: encoder.metric("vlsplit_encoder_queue_depth") == 2)

        start = time.perf_counter()
        third = stub.Encode(vision_encoder_pb2.EncodeRequest(image=make_image(48, 48, seed=9)), timeout=30)
        try:
            next(third)
            raise AssertionError("a third image was admitted past VLSPLIT_ENCODE_MAX_QUEUE=2")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "VLSPLIT_ENCODE_MAX_QUEUE" in exc.details() and "the limit is 2" in exc.details()
            assert int(dict(exc.trailing_metadata())["retry-after-ms"]) > 0
        assert time.perf_counter() - start < 5  # refused at once, not after waiting

        # 2 encodes + 1 health watch in flight; with the 4th call the server is at its limit of 4
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=120)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        info = stub.GetModelInfo(common_pb2.ModelInfoRequest(), timeout=10)  # the 4th: admitted
        assert info.model_type == "qwen2_vl"
        blockers = [stub.Encode(vision_encoder_pb2.EncodeRequest(image=make_image(48, 48, seed=1)), timeout=120)]
        threading.Thread(target=_first_reply, args=(blockers[0],), daemon=True).start()  # joins image 1's flight
        wait_for(lambda: encoder.metric("vlsplit_in_flight_requests", method="Encode") == 3)
        try:
            stub.GetModelInfo(common_pb2.ModelInfoRequest(), timeout=10)
            raise AssertionError("a 5th concurrent call was admitted past VLSPLIT_MAX_CONCURRENT_RPCS=4")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for call in [*waiting, watch, *blockers]:
            call.cancel()
        wait_for(lambda: encoder.metric("vlsplit_in_flight_requests", method="Encode") == 0)
        assert stub.GetModelInfo(common_pb2.ModelInfoRequest(), timeout=10).model_type == "qwen2_vl"  # still serving


def _first_reply(call) -> None:
    try:
        next(call, None)
    except grpc.RpcError:  # cancelled at the end of the test
        pass
