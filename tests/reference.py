"""The equivalence oracle: the monolithic transformers model, built as independently of our code as
possible (its own from_pretrained, the image processor, string-level `<|image_pad|>` expansion)."""

from __future__ import annotations

from functools import lru_cache

import torch
from PIL import Image
from tokenizers import AddedToken
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
from transformers.modeling_outputs import BaseModelOutputWithPooling

from shared.families import get_family

IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"


@lru_cache(maxsize=4)
def reference_model(path: str):
    family = get_family(AutoConfig.from_pretrained(path).model_type)
    model = family.model_class.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


ESCAPE_MARK = "QUESTION-GOES-HERE"


def escaped_ids(path: str, text: str) -> list[int]:
    """`text` tokenized with every added token escaped: the tokenizer's split_special_tokens, after
    marking its non-special added tokens (e.g. <tool_call>) special too, so none of them matches."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.backend_tokenizer.add_special_tokens([AddedToken(t.content, special=True, normalized=False)
                                                    for t in tokenizer.added_tokens_decoder.values() if not t.special])
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def reference_inputs(path: str, images: list[Image.Image], question: str | list[dict], escaped: bool = False,
                     videos: list | None = None) -> dict:
    """Model inputs for one question after the images, or for a whole conversation (a list of
    messages whose image parts take `images` in order, and whose video parts take `videos`). `escaped`: the
    question's text is tokenized with `escaped_ids` (special-token strings in it stay characters).

    videos: preprocessed clips (pixel values, grid, timing: what shared/video.py gives, which
    `make test-video-reference` checks against the official video processors); their placeholders
    are expanded as each family's processor does (`replace_video_token`)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = AutoImageProcessor.from_pretrained(path)
    videos = videos or []
    if isinstance(question, str):
        text = ESCAPE_MARK if escaped else question
        content = ([{"type": "image"} for _ in images] + [{"type": "video"} for _ in videos]
                   + [{"type": "text", "text": text}])
        messages = [{"role": "user", "content": content}]
    else:
        messages = question
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not images and not videos:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": torch.zeros_like(ids)}
    vision = image_processor(images=images, return_tensors="pt") if images else {}
    merge = image_processor.merge_size ** 2
    for grid in vision.get("image_grid_thw", []):  # as Qwen2VLProcessor does: one placeholder per merged patch
        text = text.replace(IMAGE_PAD, "<|placeholder|>" * int(grid.prod() // merge), 1)
    text = text.replace("<|placeholder|>", IMAGE_PAD)
    model_type = AutoConfig.from_pretrained(path).model_type
    for video in videos:
        t, h, w = video.grid_thw
        if model_type == "qwen3_vl":  # Qwen3VLProcessor.replace_video_token
            frame = "<|vision_start|>" + "<|placeholder|>" * (h * w // merge) + "<|vision_end|>"
            replacement = "".join(f"<{stamp:.1f} seconds>" + frame for stamp in video.video.timestamps)
        else:
            replacement = "<|placeholder|>" * (t * h * w // merge)
        text = text.replace(VIDEO_PAD, replacement, 1)
    text = text.replace("<|placeholder|>", VIDEO_PAD)
    if escaped:
        before, after = text.split(ESCAPE_MARK)
        pieces = [tokenizer(before, add_special_tokens=False)["input_ids"],
                  escaped_ids(path, question),
                  tokenizer(after, add_special_tokens=False)["input_ids"]]
        ids = torch.tensor([pieces[0] + pieces[1] + pieces[2]])
    else:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    video_id = tokenizer.convert_tokens_to_ids(VIDEO_PAD)
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == image_id).long() + 2 * (ids == video_id).long(),
    }
    if images:
        inputs.update(pixel_values=vision["pixel_values"], image_grid_thw=vision["image_grid_thw"])
    if videos:
        inputs.update(pixel_values_videos=torch.cat([v.pixel_values for v in videos]),
                      video_grid_thw=torch.tensor([list(v.grid_thw) for v in videos]))
        if model_type == "qwen2_5_vl":  # Qwen2_5_VLProcessor: temporal_patch_size / sampled fps, a tensor
            inputs["second_per_grid_ts"] = torch.tensor([v.video.second_per_grid_t for v in videos])
    return inputs


@torch.inference_mode()
def reference_tokens(path: str, images: list[Image.Image], question: str | list[dict], max_new_tokens: int = 20,
                     encoder_outputs: list | None = None, escaped: bool = False, videos: list | None = None) -> list[int]:
    """Greedy token ids of the monolithic model: generated only, final EOS removed.
    `question`: one question after the images, or a whole conversation (see reference_inputs).

    encoder_outputs: optional list of our payloads to feed as `mm_encoder_outputs` instead of
    pixel values (to compare against embeddings that went through a lossy dtype).
    """
    model = reference_model(path)
    inputs = reference_inputs(path, images, question, escaped, videos)
    if encoder_outputs is not None:
        inputs.pop("pixel_values")
        out = BaseModelOutputWithPooling(pooler_output=tuple(p.embeddings.float() for p in encoder_outputs))
        if encoder_outputs[0].deepstack:
            levels = len(encoder_outputs[0].deepstack)
            out["deepstack_features"] = [tuple(p.deepstack[i].float() for p in encoder_outputs) for i in range(levels)]
        inputs["mm_encoder_outputs"] = {"image": out}
    generated = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    tokens = generated[0, inputs["input_ids"].shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    if tokens and tokens[-1] in eos:
        tokens = tokens[:-1]
    return tokens
