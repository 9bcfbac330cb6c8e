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

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, PreTrainedTokenizerBase

from .errors import BadImage, InvalidRequest
from .image_size import grid_tokens
from .payload import VideoTiming
from .schema import MEDIA_TYPES, Message, check_role

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
# Stands for a message's text while the chat template renders (private-use characters: no template
# or tokenizer treats them specially).
_PLACEHOLDER = "\ue000{}\ue001"
_PLACEHOLDER_RE = re.compile("\ue000(\\d+)\ue001")


@dataclass(frozen=True)
class ImageInputs:
    pixel_values: torch.Tensor  # [n_patches, C * temporal_patch * patch * patch], float32
    grid_thw: tuple[int, int, int]  # patch grid before the spatial merge


@dataclass(frozen=True)
class PromptInputs:
    input_ids: torch.Tensor  # [L] int64
    mm_token_type_ids: torch.Tensor  # [L] int64: 1 at image tokens, 2 at video tokens, else 0


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
    """`video_prompt` (the family's): "flat" and "seconds" expand a clip's `<|video_pad|>` to all its
    tokens; "timestamps" (Qwen3-VL) to `<t seconds><|vision_start|>` + one frame's tokens + `<|vision_end|>`
    per temporal patch, as Qwen3VLProcessor.replace_video_token does (inside the template's own
    vision_start / vision_end)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, merge_size: int, video_prompt: str = "flat"):
        if tokenizer.chat_template is None:
            raise InvalidRequest("the checkpoint has no chat template")
        self.tokenizer = tokenizer
        self.merge_size = merge_size
        self.video_prompt = video_prompt
        self.image_token_id: int = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.video_token_id: int = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
        self.vision_start_id: int = tokenizer.convert_tokens_to_ids("<|vision_start|>")
        self.vision_end_id: int = tokenizer.convert_tokens_to_ids("<|vision_end|>")
        # Every added token (special or not), longest first, as the tokenizer matches them.
        self._added = {token.content: token_id for token_id, token in tokenizer.added_tokens_decoder.items()}
        self._added_re = re.compile("(" + "|".join(re.escape(t) for t in sorted(self._added, key=len, reverse=True))
                                    + ")")

    @classmethod
    def from_pretrained(cls, path: str | Path, merge_size: int, video_prompt: str = "flat") -> "PromptBuilder":
        return cls(AutoTokenizer.from_pretrained(path, local_files_only=True), merge_size, video_prompt)

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        validate_messages(messages)
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def token_ids(self, messages: list[Message]) -> list[int]:
        """The rendered prompt's ids, where only the chat template makes special or added tokens: text
        from messages is tokenized as plain text, so `<|im_start|>` in a question is those characters.
        For text without such strings this is exactly the tokenizer on the rendered prompt."""
        texts: list[str] = []

        def hide(text: str) -> str:
            texts.append(text)
            return _PLACEHOLDER.format(len(texts) - 1)

        hidden = [{**m, "content": hide(m["content"]) if isinstance(m["content"], str) else
                   [{**part, "text": hide(part["text"])} if part.get("type") == "text" else part
                    for part in m["content"]]} for m in messages]
        rendered = self.render(hidden)
        pieces = _PLACEHOLDER_RE.split(rendered)  # template, text index, template, ...
        if "".join(texts[int(p)] if i % 2 else p for i, p in enumerate(pieces)) != self.render(messages):
            raise InvalidRequest("this checkpoint's chat template rewrites message text; it is not supported")
        ids: list[int] = []
        plain = ""  # text between two special tokens, tokenized as one piece (as the tokenizer does)
        for i, piece in enumerate(pieces):
            if i % 2:
                plain += texts[int(piece)]
                continue
            for j, part in enumerate(self._added_re.split(piece)):
                if j % 2 == 0:
                    plain += part
                else:
                    ids += self.plain_ids(plain) + [self._added[part]]
                    plain = ""
        return ids + self.plain_ids(plain)

    def plain_ids(self, text: str) -> list[int]:
        """`text` through the normalizer, pre-tokenizer and model only: never an added token."""
        if not text:
            return []
        backend = self.tokenizer.backend_tokenizer
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        pieces = backend.pre_tokenizer.pre_tokenize_str(text) if backend.pre_tokenizer else [(text, None)]
        return [token.id for piece, _ in pieces for token in backend.model.tokenize(piece)]

    def __call__(self, messages: list[Message], grids: list[tuple[int, int, int]],
                 videos: list[VideoTiming | None] | None = None) -> PromptInputs:
        """Prompt ids for `messages`, whose image and video items take the given grids in order;
        `videos[k]` is item k's clip timing (None for an image; all None when not given)."""
        videos = videos if videos is not None else [None] * len(grids)
        ids = self.token_ids(messages)
        media = (self.image_token_id, self.video_token_id)
        slots = [i for i, tok in enumerate(ids) if tok in media]
        if len(slots) != len(grids):
            raise InvalidRequest(f"the messages hold {len(slots)} images and clips but {len(grids)} were given")
        # Expanding ids rather than text is exact: special tokens never merge with neighbours.
        expanded: list[int] = []
        prev = 0
        for k, (slot, grid, video) in enumerate(zip(slots, grids, videos)):
            is_video = ids[slot] == self.video_token_id
            if is_video != (video is not None):
                raise InvalidRequest(f"item {k} of the messages is {'a clip' if is_video else 'an image'}, "
                                     f"but its embeddings are {'an image' if is_video else 'a clip'}'s")
            expanded += ids[prev:slot] + (self.video_tokens(grid, video) if is_video else
                                          [self.image_token_id] * self.tokens_per_image(grid))
            prev = slot + 1
        expanded += ids[prev:]
        input_ids = torch.tensor(expanded, dtype=torch.long)
        mm = (input_ids == self.image_token_id).long() + 2 * (input_ids == self.video_token_id).long()
        return PromptInputs(input_ids, mm)

    def video_tokens(self, grid: tuple[int, int, int], video: VideoTiming) -> list[int]:
        t, h, w = grid
        if self.video_prompt != "timestamps":
            return [self.video_token_id] * self.tokens_per_image(grid)
        if len(video.timestamps) != t:
            raise InvalidRequest(f"a clip of {t} temporal patches carries {len(video.timestamps)} timestamps")
        frame = [self.vision_start_id] + [self.video_token_id] * grid_tokens((1, h, w), self.merge_size) + [self.vision_end_id]
        out: list[int] = []
        for stamp in video.timestamps:
            out += self.plain_ids(f"<{stamp:.1f} seconds>") + frame
        return out

    def media_runs(self, grid: tuple[int, int, int], video: VideoTiming | None) -> list[tuple[int, int, int]]:
        """The grids of an item's runs of placeholder tokens in the prompt (and in M-RoPE): one run, or
        with timestamps one (1, h, w) run per temporal patch of a clip."""
        if video is not None and self.video_prompt == "timestamps":
            return [(1, grid[1], grid[2])] * grid[0]
        return [grid]

    def tokens_per_image(self, grid: tuple[int, int, int]) -> int:
        return grid_tokens(grid, self.merge_size)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def validate_messages(messages: list[Message]) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"message {i} must be a dict with a role and content")
        try:
            check_role(i, message.get("role"))
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise InvalidRequest(f"message {i}: content must be a string or a list of parts")
        for part in parts:
            _validate_part(i, part)


def _validate_part(i: int, part: Any) -> None:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in MEDIA_TYPES:
        return
    if kind != "text" or not isinstance(part.get("text"), str):
        raise InvalidRequest(f"message {i}: each part must be {{'type': 'image'}}, {{'type': 'video'}} or "
                             "{'type': 'text', 'text': str}")
