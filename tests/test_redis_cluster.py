"""The encoder cache and upload store on a real 3-master Redis Cluster: entries (also the multi-part
ones) written by one replica are hits on another, and uploads resolve across replicas."""

from __future__ import annotations

import pytest

from procs import RedisCluster, Service
from test_encoder_service import encode, gradient_png, stub
from vlsplit.v1 import vision_encoder_pb2 as pb


@pytest.fixture
def cluster(tmp_path):
    server = RedisCluster(tmp_path).start()
    yield server
    server.stop()


def test_replicas_share_the_cache_through_a_redis_cluster(tiny_models, cluster, tmp_path):
    # 4 KiB parts: every payload here is stored as a manifest + parts, which must share a slot
    env = {"VLSPLIT_CACHE_PART_BYTES": "4096"}
    a, b = (Service("encoder", "--model", tiny_models["qwen2_vl"], "--redis", cluster.url, "--payload-dtype",
                    "float32", log_dir=tmp_path, env=env) for _ in range(2))
    try:
        for service in (a.start(wait=False), b.start(wait=False)):  # the models load side by side
            service.wait_serving()
        images = [gradient_png(200 + 40 * i, shift=30 + i) for i in range(6)]  # keys spread over the slots
        firsts = [encode(a, image=data) for data in images]
        seconds = [encode(b, image=data) for data in images]
        assert all(not f.cache_hit and f.info.payload_bytes > 4096 for f in firsts)
        assert all(s.cache_hit for s in seconds) and [s.blob for s in seconds] == [f.blob for f in firsts]
        assert a.metric("vlsplit_cache_errors_total") == b.metric("vlsplit_cache_errors_total") == 0

        put = stub(a).PutImage(pb.PutImageRequest(image=gradient_png(333, shift=40)))
        by_id = encode(b, image_id=put.image_id)  # uploaded through A, resolved by B
        assert not by_id.cache_hit and by_id.info.n_tokens > 0
        assert b.metric("vlsplit_encoder_encodes_total") == 1
    finally:
        a.kill(), b.kill()
