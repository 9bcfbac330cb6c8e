"""The OpenVINO encoder backend (services/vision_encoder/openvino_backend.py) against the torch tower.

Tolerance (float32, all three families, tiny checkpoints): cosine >= 0.99999 and max |diff| <= 1e-4 per
payload tensor (embeddings and every Qwen3-VL deepstack level), values of magnitude ~1-3. Measured: max
|diff| 1.4e-6 to 2.7e-6, cosine 1.0 to 7 digits; OpenVINO's kernels sum in another order than torch's,
so bit equality is not expected. int8 (nncf weights) is bounded loosely, as shared/quantize.py's int8 is.
"""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from conftest import FAMILIES, make_image
from services.vision_encoder.engine import VisionEngine
from services.vision_encoder.openvino_backend import TowerPrelude, cache_key, import_openvino, window_layout
from shared.images import load_image

pytest.importorskip("openvino", reason="the openvino extra: pip install -e '.[openvino]' (make setup does)")

MIN_COSINE, MAX_ABS = 0.99999, 1e-4
# (width, height): one image; two of different sizes in one call; a non-square one (Qwen2.5-VL: several
# 8x8-patch windows, the edge ones short)
CASES = {"single": [(64, 64)], "two_sizes": [(96, 64), (160, 224)], "non_square": [(300, 120)]}


def images(sizes, seed=0):
    return [load_image(make_image(w, h, seed=seed + k)) for k, (w, h) in enumerate(sizes)]


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("openvino-ir")


@pytest.fixture(scope="module")
def engines(tiny_models, cache_root):
    """family -> (torch reference, OpenVINO engine), float32."""
    return {f: (VisionEngine(tiny_models[f]), VisionEngine(tiny_models[f], backend="openvino",
                                                           openvino_cache_dir=cache_root))
            for f in FAMILIES}


def assert_close(expected, actual, min_cosine=MIN_COSINE, max_abs=MAX_ABS):
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        assert e.grid_thw == a.grid_thw and e.fingerprint == a.fingerprint
        assert a.embeddings.dtype == e.embeddings.dtype and len(a.deepstack) == len(e.deepstack)
        for x, y in [(e.embeddings, a.embeddings), *zip(e.deepstack, a.deepstack)]:
            assert x.shape == y.shape
            cosine = torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0)
            assert cosine >= min_cosine and (x - y).abs().max() <= max_abs, (float(cosine), float((x - y).abs().max()))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("family", FAMILIES)
def test_openvino_matches_the_torch_tower(engines, family, case):
    reference, openvino = engines[family]
    batch = images(CASES[case])
    assert_close(reference.encode(batch), openvino.encode(batch))
    if family == "qwen3_vl":
        assert len(openvino.encode(batch)[0].deepstack) == 3


def test_qwen2_5_windows_are_several_and_some_short(engines):
    """The non-square case really exercises the padded window layout (not one window per image)."""
    reference, _ = engines["qwen2_5_vl"]
    inputs = reference.preprocess(images(CASES["non_square"]))
    segment = TowerPrelude(reference.tower).segment(inputs[0].pixel_values, inputs[0].grid_thw)
    mask = segment.feed["key_mask"]
    assert mask.shape[0] > 2 and not mask.all()


def test_window_layout_round_trips():
    cu = torch.tensor([0, 4, 12, 14], dtype=torch.int32)
    layout = window_layout(cu)
    assert layout["key_mask"].shape == (3, 8) and layout["key_mask"].sum() == 14
    rows = torch.arange(14)
    assert torch.equal(rows[layout["pad_index"]][layout["unpad_index"]], rows)


def test_backend_name_and_weights_are_reported(engines):
    _, openvino = engines["qwen2_vl"]
    assert openvino.backend_name().startswith("openvino 20") and openvino.weight_bytes() > 0
    assert openvino.tower.blocks is None  # the torch copy of the blocks is dropped once converted


def test_second_engine_loads_the_ir_without_converting(tiny_models, engines, cache_root, caplog):
    first = engines["qwen2_5_vl"][1]
    assert first.openvino.source == "converted"
    with caplog.at_level(logging.INFO, logger="vlsplit.vision"):
        second = VisionEngine(tiny_models["qwen2_5_vl"], backend="openvino", openvino_cache_dir=cache_root)
    assert second.openvino.source == "cache" and "loaded from the IR cache" in caplog.text
    assert not any(".blocks." in name for name in second.checkpoint.reads)  # block weights never read
    batch = images(CASES["two_sizes"], seed=5)
    for a, b in zip(first.encode(batch), second.encode(batch)):
        assert torch.equal(a.embeddings, b.embeddings)


@pytest.mark.parametrize("damage", ["truncated_bin", "no_meta", "garbage_xml"])
def test_a_damaged_cache_entry_is_converted_again(tiny_models, tmp_path, damage):
    model = tiny_models["qwen2_vl"]
    VisionEngine(model, backend="openvino", openvino_cache_dir=tmp_path)
    entry = next(p for p in tmp_path.iterdir() if not p.name.startswith("."))
    if damage == "truncated_bin":
        data = (entry / "tower.bin").read_bytes()
        (entry / "tower.bin").write_bytes(data[: len(data) // 2])
    elif damage == "no_meta":
        (entry / "meta.json").unlink()
    else:
        (entry / "tower.xml").write_text("<net>not a model")
        (entry / "meta.json").write_text('{"files": {}}')  # sizes "match": the read itself must fail
    again = VisionEngine(model, backend="openvino", openvino_cache_dir=tmp_path)
    assert again.openvino.source == "converted"
    assert VisionEngine(model, backend="openvino", openvino_cache_dir=tmp_path).openvino.source == "cache"
    assert_close(VisionEngine(model).encode(images([(64, 48)])), again.encode(images([(64, 48)])))
    assert [p.name for p in tmp_path.iterdir()] == [entry.name]  # nothing left aside or half-written


def test_int8_weights_through_nncf(tiny_models, tmp_path):
    pytest.importorskip("nncf")
    model = tiny_models["qwen2_5_vl"]
    int8 = VisionEngine(model, backend="openvino", quantize="int8", openvino_cache_dir=tmp_path)
    assert int8.backend_name().endswith("nncf int8 weights")
    assert (tmp_path / cache_key(int8.fingerprint, "int8")).is_dir()
    batch = images(CASES["non_square"])
    assert_close(VisionEngine(model).encode(batch), int8.encode(batch), min_cosine=0.999, max_abs=0.2)


def test_backend_setting_is_validated(tiny_models):
    from shared.config import EncoderConfig, load

    with pytest.raises(ValueError, match="VLSPLIT_ENCODER_BACKEND"):
        VisionEngine(tiny_models["qwen2_vl"], backend="onnx")
    with pytest.raises(ValueError, match="VLSPLIT_ENCODER_BACKEND=tensorrt: expected one of torch, openvino"):
        load(EncoderConfig, environ={"VLSPLIT_MODEL": tiny_models["qwen2_vl"], "VLSPLIT_ENCODER_BACKEND": "tensorrt"})


def test_missing_openvino_names_the_setting_and_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    with pytest.raises(ValueError, match=r"VLSPLIT_ENCODER_BACKEND=openvino.*pip install"):
        import_openvino()


def test_encoder_server_serves_openvino_payloads(tiny_models, engines, tmp_path):
    """End to end, one family: `vlsplit serve encoder --backend openvino`, its payloads and GetModelInfo."""
    import grpc

    from procs import Service
    from shared.codec import decode_payload
    from vlsplit.v1 import common_pb2, vision_encoder_pb2 as pb, vision_encoder_pb2_grpc

    service = Service("encoder", "--model", tiny_models["qwen3_vl"], "--redis", "memory", "--backend", "openvino",
                      log_dir=tmp_path, env={"VLSPLIT_OPENVINO_CACHE_DIR": str(tmp_path / "ir")}).start()
    try:
        with grpc.insecure_channel(service.address) as channel:
            stub = vision_encoder_pb2_grpc.VisionEncoderStub(channel)
            info = stub.GetModelInfo(common_pb2.ModelInfoRequest(), timeout=30)
            data = make_image(120, 90, seed=77)
            first, *chunks = list(stub.Encode(pb.EncodeRequest(image=data), timeout=60))
    finally:
        service.kill()
    assert info.backend.startswith("openvino 20") and info.quantize == "off" and info.weight_bytes > 0
    remote = decode_payload(b"".join(m.chunk for m in chunks))
    assert first.info.n_tokens == remote.n_tokens and len(remote.deepstack) == 3
    assert_close(engines["qwen3_vl"][0].encode([load_image(data)]), [remote])
