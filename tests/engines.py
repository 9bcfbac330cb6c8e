"""In-process engines and inputs for the decoder-engine tests (built once per session)."""

from __future__ import annotations

from functools import lru_cache

from conftest import make_image
from services.llm_decoder.engine import DecoderEngine, GenerationInput
from shared.sampling import SamplingParams
from services.vision_encoder.engine import VisionEngine
from shared.image_ids import image_id
from shared.images import load_image
from shared.schema import question_messages


@lru_cache(maxsize=None)
def engines(path: str) -> tuple[VisionEngine, DecoderEngine]:
    return VisionEngine(path), DecoderEngine(path)


@lru_cache(maxsize=None)
def image_payload(path: str, seed: int, width: int = 256, height: int = 192):
    """(payload naming its image, image id, PIL image) of a test image, encoded once."""
    data = make_image(width, height, seed=seed)
    img_id = image_id(data)
    return engines(path)[0].encode([load_image(data)])[0].named(img_id), img_id, load_image(data)


def request(payload, img_id: str, question: str, max_new_tokens: int = 12, **sampling) -> GenerationInput:
    return GenerationInput(question_messages(question), [payload],
                             SamplingParams(max_new_tokens=max_new_tokens, **sampling), (img_id,))


def tokens(events) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


def batch_tokens(decoder: DecoderEngine, requests: list[GenerationInput]) -> list[list[int]]:
    out: dict[int, list[int]] = {i: [] for i in range(len(requests))}
    for index, event in decoder.generate_batch(requests):
        if event.token_id is not None:
            out[index].append(event.token_id)
    return [out[i] for i in range(len(requests))]
