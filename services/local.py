"""`vlsplit local-ask`: encoder and decoder in one process, the image encoded once for all questions."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from services.llm_decoder.engine import DecoderEngine, GenerationInput
from shared.sampling import SamplingParams
from services.vision_encoder.engine import VisionEngine
from shared.image_ids import image_id
from shared.images import ImageLimits, load_image
from shared.schema import question_messages


@dataclass(frozen=True)
class Answer:
    question: str
    text: str
    token_ids: list[int]
    image_id: str
    finish_reason: str
    encode_ms: float
    ttft_ms: float
    total_ms: float

    def to_json(self) -> dict:
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


class LocalPipeline:
    def __init__(self, model: str | Path, dtype: torch.dtype = torch.float32, limits: ImageLimits = ImageLimits()):
        self.encoder = VisionEngine(model, dtype=dtype)
        self.decoder = DecoderEngine(model, dtype=dtype)
        self.limits = limits

    def ask(self, image_bytes: bytes, questions: Iterable[str], sampling: SamplingParams) -> Iterator[Answer]:
        """Answers one after another; the image is encoded once, and its KV is computed once (the
        decoder reuses the image's cached blocks for every further question)."""
        start = time.perf_counter()
        img_id = image_id(image_bytes)
        [payload] = self.encoder.encode([load_image(image_bytes, self.limits)])
        payload = payload.named(img_id)
        encode_ms = (time.perf_counter() - start) * 1000
        for question in questions:
            yield self._answer(question, payload, sampling, img_id, encode_ms)
            encode_ms = 0.0  # the image was encoded once, for the first question

    def _answer(self, question, payload, sampling, img_id, encode_ms) -> Answer:
        start = time.perf_counter()
        request = GenerationInput(question_messages(question), [payload], sampling, (img_id,))
        ids, text, ttft, finish = [], [], None, "length"
        for event in self.decoder.generate(request):
            ttft = ttft if ttft is not None else (time.perf_counter() - start) * 1000
            if event.token_id is not None:
                ids.append(event.token_id)
            text.append(event.text)
            finish = event.finish_reason or finish
        total = (time.perf_counter() - start) * 1000
        return Answer(question, "".join(text), ids, img_id, finish, encode_ms, ttft or total, total + encode_ms)
