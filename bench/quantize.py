"""What `--quantize int8` costs in accuracy and saves in memory, on a bench checkpoint.

    .venv/bin/python bench/quantize.py [--family qwen2_vl] [--dtype auto] [--prompts 64] [--new-tokens 16]

For one image and `--prompts` different questions, the same decoder unquantized and int8 (same dtype,
same run) answer greedily. Printed: weights resident (MiB) for the decoder and the vision tower, the
cosine of the first answer token's logits (over the vocabulary; mean and worst), and greedy agreement
(answers identical, first tokens identical, mean fraction of each answer before the first difference).
The vision tower's embeddings: cosine between the unquantized and the int8 tower's output.

The bench checkpoints have random weights: a random network amplifies any rounding (bf16 alone moves
its logits to a cosine of ~0.99 against float32, printed as the yardstick) and its logits are flat, so
near-ties flip and greedy agreement here is a pessimistic figure; run it on a real checkpoint with
--model DIR for the number that matters to you.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ensure_model, machine, photo  # noqa: E402

TOPICS = ["the sky", "the ground", "a person", "an animal", "text", "a vehicle", "food", "water"]
FORMS = ["Is there {} in the picture?", "Describe {} in one sentence.", "What colour is {}?",
         "Where is {} in the image?", "How large is {}?", "Is {} in focus?", "Count {}.", "Why is {} there?"]


def prompts(n: int) -> list[str]:
    return [FORMS[i % len(FORMS)].format(TOPICS[(i // len(FORMS)) % len(TOPICS)]) + ("" if i < 64 else f" ({i})")
            for i in range(n)]


def answer(decoder, payload, img_id: str, question: str, new_tokens: int):
    """(first-token logits [vocab], greedy token ids)."""
    from services.llm_decoder.engine import GenerationInput
    from shared.schema import question_messages
    from shared.sampling import SamplingParams

    seen = []
    hook = decoder.runner.lm_head.register_forward_hook(lambda m, a, out: seen.append(out[-1].float().clone()))
    try:
        req = GenerationInput(question_messages(question), [payload], SamplingParams(max_new_tokens=new_tokens),
                                (img_id,))
        ids = [e.token_id for e in decoder.generate(req) if e.token_id is not None]
    finally:
        hook.remove()
    return seen[0], ids


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="qwen2_vl")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    import torch

    from services.llm_decoder.engine import DecoderEngine
    from services.vision_encoder.engine import VisionEngine
    from shared.hardware import resolve_dtype
    from shared.image_ids import image_id
    from shared.images import load_image

    model = args.model or ensure_model(args.family)
    dtype_name = resolve_dtype(args.dtype, "cpu").name
    dtype = getattr(torch, dtype_name)
    data = photo(448, 448, seed=5)
    image = load_image(data)
    towers = {q: VisionEngine(model, dtype=dtype, quantize=q) for q in ("off", "int8")}
    payloads = {q: t.encode([image])[0] for q, t in towers.items()}
    emb_cos = torch.nn.functional.cosine_similarity(payloads["off"].embeddings.float().flatten(),
                                                    payloads["int8"].embeddings.float().flatten(), dim=0).item()
    payload = payloads["off"].named(image_id(data))  # both decoders get the unquantized tower's embeddings
    decoders = {q: DecoderEngine(model, dtype=dtype, quantize=q, packed_linear="off") for q in ("off", "int8")}
    # the yardstick: how far bf16 itself moves the logits from float32 (random-weight models amplify any rounding)
    yardstick = DecoderEngine(model, dtype=torch.float32, packed_linear="off") if dtype != torch.float32 else None
    cosines, same, first, prefix, bf16_cosines = [], 0, 0, [], []
    for question in prompts(args.prompts):
        (la, ia), (lb, ib) = (answer(decoders[q], payload, image_id(data), question, args.new_tokens)
                              for q in ("off", "int8"))
        cosines.append(torch.nn.functional.cosine_similarity(la, lb, dim=0).item())
        if yardstick is not None:
            lf, _ = answer(yardstick, payload, image_id(data), question, 1)
            bf16_cosines.append(torch.nn.functional.cosine_similarity(la, lf, dim=0).item())
        same += ia == ib
        first += ia[:1] == ib[:1]
        prefix.append(common_prefix(ia, ib) / max(1, len(ia)))
    mib = lambda b: b / 2**20  # noqa: E731
    print(f"{model.name}, {dtype_name}; CPU: {machine()}")
    print("| | unquantized | int8 |\n|---|---|---|")
    print(f"| decoder weights resident | {mib(decoders['off'].runner.weight_bytes()):.0f} MiB | "
          f"{mib(decoders['int8'].runner.weight_bytes()):.0f} MiB |")
    print(f"| vision tower weights resident | {mib(towers['off'].weight_bytes()):.0f} MiB | "
          f"{mib(towers['int8'].weight_bytes()):.0f} MiB |")
    print(f"\nlogits cosine, first answer token, {args.prompts} prompts: mean {statistics.mean(cosines):.5f}, "
          f"worst {min(cosines):.5f}")
    if bf16_cosines:
        print(f"yardstick: {dtype_name} vs float32 logits cosine (both unquantized): mean "
              f"{statistics.mean(bf16_cosines):.5f}, worst {min(bf16_cosines):.5f}")
    print(f"greedy agreement over {args.new_tokens} tokens: identical answers {same}/{args.prompts}, "
          f"identical first token {first}/{args.prompts}, mean agreeing prefix {statistics.mean(prefix):.2f}")
    print(f"vision embeddings cosine (int8 tower vs unquantized): {emb_cos:.5f}")


if __name__ == "__main__":
    main()
