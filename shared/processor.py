"""The Qwen-VL processor, assembled without torchvision.

The official `Qwen*VLProcessor` needs a video processor that imports torchvision; we only serve
images, so we put the same pieces together ourselves:

- `ImagePreprocessor` (encoder side): validated RGB image -> pixel_values [n_patches, C*T*P*P] and
  grid_thw (t, h, w), via transformers' PIL image processor (`Qwen2VLImageProcessorPil`).
- `PromptBuilder` (decoder side): chat messages -> prompt ids with each `<|image_pad|>` expanded
  to the image's token count, plus `mm_token_type_ids` (0 text, 1 image) that M-RoPE needs.

Both must produce exactly what transformers' own processor would; tests/test_processor.py checks it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, PreTrainedTokenizerBase

from .errors import BadImage, InvalidRequest

IMAGE_TOKEN = "<|image_pad|>"
# Markup a user must not smuggle into text: it would desynchronise image tokens and embeddings.
RESERVED_MARKUP = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")
ROLES = ("system", "user", "assistant")

Message = dict[str, Any]  # {"role": str, "content": str | [{"type": "image"} | {"type": "text", "text": str}]}


@dataclass(frozen=True)
class ImageInputs:
    pixel_values: torch.Tensor  # [n_patches, C * temporal_patch * patch * patch], float32
    grid_thw: tuple[int, int, int]  # patch grid before the spatial merge


@dataclass(frozen=True)
class PromptInputs:
    input_ids: torch.Tensor  # [L] int64
    mm_token_type_ids: torch.Tensor  # [L] int64: 1 at image tokens, else 0


class ImagePreprocessor:
    def __init__(self, image_processor):
        self.image_processor = image_processor
        self.merge_size: int = image_processor.merge_size

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ImagePreprocessor":
        return cls(AutoImageProcessor.from_pretrained(path, local_files_only=True))

    def __call__(self, image: Image.Image) -> ImageInputs:
        try:
            out = self.image_processor(images=[image], return_tensors="pt")
        except ValueError as exc:  # smart_resize refuses aspect ratios over 200
            raise BadImage(f"image {image.width}x{image.height} cannot be processed: {exc}") from exc
        t, h, w = (int(v) for v in out["image_grid_thw"][0])
        return ImageInputs(pixel_values=out["pixel_values"], grid_thw=(t, h, w))


class PromptBuilder:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, merge_size: int):
        if tokenizer.chat_template is None:
            raise InvalidRequest("the checkpoint has no chat template")
        self.tokenizer = tokenizer
        self.merge_size = merge_size
        self.image_token_id: int = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    @classmethod
    def from_pretrained(cls, path: str | Path, merge_size: int) -> "PromptBuilder":
        return cls(AutoTokenizer.from_pretrained(path, local_files_only=True), merge_size)

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        validate_messages(messages)
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def __call__(self, messages: list[Message], grids: list[tuple[int, int, int]]) -> PromptInputs:
        """Prompt ids for `messages`, whose image items take the given grids in order."""
        ids = self.tokenizer(self.render(messages), add_special_tokens=False)["input_ids"]
        slots = [i for i, tok in enumerate(ids) if tok == self.image_token_id]
        if len(slots) != len(grids):
            raise InvalidRequest(f"the messages hold {len(slots)} images but {len(grids)} were given")
        # Expanding ids rather than text is exact: special tokens never merge with neighbours.
        expanded: list[int] = []
        prev = 0
        for slot, grid in zip(slots, grids):
            expanded += ids[prev:slot] + [self.image_token_id] * self.tokens_per_image(grid)
            prev = slot + 1
        expanded += ids[prev:]
        input_ids = torch.tensor(expanded, dtype=torch.long)
        return PromptInputs(input_ids, (input_ids == self.image_token_id).long())

    def tokens_per_image(self, grid: tuple[int, int, int]) -> int:
        t, h, w = grid
        return t * h * w // self.merge_size**2

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def question_messages(question: str, n_images: int = 1) -> list[Message]:
    """The one-turn prompt: the image(s), then the question."""
    content: list[dict] = [{"type": "image"} for _ in range(n_images)]
    return [{"role": "user", "content": content + [{"type": "text", "text": question}]}]


def validate_messages(messages: list[Message]) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise InvalidRequest(f"message {i}: role must be one of {', '.join(ROLES)}")
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise InvalidRequest(f"message {i}: content must be a string or a list of parts")
        for part in parts:
            _validate_part(i, part)


def _validate_part(i: int, part: Any) -> None:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "image":
        return
    if kind != "text" or not isinstance(part.get("text"), str):
        raise InvalidRequest(f"message {i}: each part must be {{'type': 'image'}} or {{'type': 'text', 'text': str}}")
    for markup in RESERVED_MARKUP:
        if markup in part["text"]:
            raise InvalidRequest(f"message {i}: text may not contain the reserved marker {markup}")
