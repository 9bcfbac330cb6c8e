"""One clip, ten questions: the split engines vs the monolithic transformers model, same process, same run.

    .venv/bin/python bench/video.py [--seconds 16] [--size 448] [--fps 30] [--sample-fps 0] [--questions 10]
                                    [--rounds 3] [--no-monolithic]
                                    [--family qwen2_vl] [--dtype auto]

The clip: `--seconds` of `--size` x `--size` h264 at `--fps` (made here with PyAV: a smooth textured
picture drifting a few pixels a frame), sampled at the checkpoint's rate (2 frames a second) unless
`--sample-fps` says otherwise. Measured on the `bench` checkpoint (Qwen2-VL-2B widths, few layers, random
weights), at the serving default dtype (`resolve_dtype("auto", "cpu")`):

- decode + sample: `shared/video.read_clip` (open, count packets, decode every frame up to the last sampled
  one, convert and resize the sampled ones);
- preprocess: normalise and patchify those frames (`VideoPreprocessor.patches`);
- tower: `VisionEngine.encode_inputs` on the clip (the encoder's work on a cache miss);
- TTFT of question 1: `DecoderEngine.generate` until its first token (the whole prompt prefilled: the clip's
  tokens and the question), and of question 10, asked of the same decoder after questions 2..9 (the clip's
  KV comes from the prefix cache: only the question's tokens are prefilled; the encoder's cache would hand the
  payload over, so no tower either);
- the monolithic model (`*ForConditionalGeneration.from_pretrained`, sdpa): `generate(max_new_tokens=1)` on
  `pixel_values_videos` / `video_grid_thw` (tests/reference.py builds its inputs from the same preprocessed
  clip): its tower and prefill, every question again (it has no cache). Its decode + preprocess are the same
  code as ours and counted once; question 10 reuses them (in the monolith's favour).

Both paths are warmed up first on a 2 s clip of another picture. `--rounds` measurements (default 3), each
on another clip of the same size (so nothing of it is cached); the table has their medians (and minima). On 2
cores the default run takes about 3 minutes.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import ensure_model, machine  # noqa: E402

QUESTIONS = ["What happens in this clip?", "What colours do you see?", "Is anything moving?",
             "Describe the first second.", "Describe the last second.", "How many objects are there?",
             "Is it day or night?", "What is the texture like?", "Which way does the picture drift?",
             "Summarise the clip in one sentence."]


def make_bench_clip(seconds: float, size: int, fps: int, seed: int = 0) -> bytes:
    """`seconds` of h264 at `fps`, size x size: smooth structure plus texture, drifting 3 px a frame (what
    a real camera pan compresses like, unlike tests/clips.py's random noise)."""
    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    width = size * 2  # room to drift across
    y, x = np.mgrid[0:size, 0:width] / size
    base = np.stack([np.sin(6 * x + seed), np.cos(5 * y + x), np.sin(4 * (x + y))], -1) * 90 + 128
    base = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23"}
        for i in range(round(seconds * fps)):
            shift = (i * 3) % (width - size)
            frame = np.ascontiguousarray(base[:, shift:shift + size])
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=16.0, help="clip length")
    parser.add_argument("--size", type=int, default=448, help="clip width and height")
    parser.add_argument("--fps", type=int, default=30, help="the clip's own frame rate")
    parser.add_argument("--sample-fps", type=float, default=0.0, help="frames sampled a second (0: the checkpoint's)")
    parser.add_argument("--questions", type=int, default=10)
    parser.add_argument("--family", default="qwen2_vl")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--rounds", type=int, default=3, help="measurements, each on another clip")
    parser.add_argument("--no-monolithic", action="store_true", help="skip the transformers baseline")
    args = parser.parse_args()

    import torch
    from transformers import AutoConfig

    from services.llm_decoder.engine import DecoderEngine, GenerationInput
    from services.vision_encoder.engine import VisionEngine
    from shared.families import get_family
    from shared.hardware import resolve_dtype
    from shared.image_ids import VideoParams, image_id, video_media_id
    from shared.sampling import SamplingParams
    from shared.video import VideoLimits, read_clip

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from reference import reference_inputs  # the equivalence tests' monolithic inputs (no torchvision needed)

    wall = time.perf_counter()
    model = args.model or ensure_model(args.family)
    choice = resolve_dtype(args.dtype, "cpu")
    dtype = getattr(torch, choice.name)
    load = time.perf_counter()
    encoder = VisionEngine(model, dtype=dtype)
    decoder = DecoderEngine(model, dtype=dtype)  # serving defaults: prefix caching on, 2048-token steps
    family = get_family(AutoConfig.from_pretrained(model).model_type)
    mono = None if args.no_monolithic else family.model_class.from_pretrained(
        model, dtype=dtype, attn_implementation="sdpa").eval()
    load_s = time.perf_counter() - load
    limits = VideoLimits()
    params = VideoParams(fps=args.sample_fps)
    sampling = encoder.video.sampling(limits, fps=args.sample_fps or None)

    def ask(payload, question: str) -> tuple[float, int, int]:
        """Decoder TTFT (s), prompt tokens, and those computed (the rest came from the prefix cache)."""
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        request = GenerationInput(messages, [payload], SamplingParams(max_new_tokens=1))
        before = decoder.prefilled_tokens
        start = time.perf_counter()
        ttft, prompt = None, 0
        for event in decoder.generate(request):
            if ttft is None and event.token_id is not None:
                ttft = time.perf_counter() - start
            if event.usage is not None:
                prompt = event.usage.prompt_tokens
        ttft = ttft if ttft is not None else time.perf_counter() - start
        return ttft, prompt, decoder.prefilled_tokens - before

    @torch.inference_mode()
    def mono_ttft(inputs, question: str) -> float:
        feed = reference_inputs(str(model), [], question, videos=[inputs])
        feed["pixel_values_videos"] = feed["pixel_values_videos"].to(dtype)
        start = time.perf_counter()
        mono.generate(**feed, do_sample=False, max_new_tokens=1)
        return time.perf_counter() - start

    def split(data: bytes) -> dict:
        start = time.perf_counter()
        clip = read_clip(data, encoder.video, sampling, limits)
        decoded = time.perf_counter()
        inputs = encoder.video.patches(clip)
        prepared = time.perf_counter()
        [payload] = encoder.encode_inputs([inputs])
        towered = time.perf_counter()
        payload = payload.named(video_media_id(image_id(data), params))  # what the encoder names it
        return {"clip": clip, "inputs": inputs, "payload": payload, "decode_s": decoded - start,
                "preprocess_s": prepared - decoded, "tower_s": towered - prepared}

    print(f"making {args.rounds} clip(s): {args.seconds:g} s, {args.size}x{args.size}, {args.fps} fps, h264 ...",
          flush=True)
    clips = [make_bench_clip(args.seconds, args.size, args.fps, seed=10 + r) for r in range(args.rounds)]
    warm = make_bench_clip(2.0, min(args.size, 224), args.fps, seed=1)

    print("warming up both paths on a 2 s clip ...", flush=True)
    w = split(warm)
    ask(w["payload"], "warm-up")
    if mono is not None:
        mono_ttft(w["inputs"], "warm-up")

    last = args.questions
    rounds = []
    for r, data in enumerate(clips):  # each round another clip (of the same size): nothing of it is cached
        print(f"round {r + 1}: split engines ...", flush=True)
        s = split(data)
        ttfts, computed, prompts = [], [], []
        for q in range(last):
            question = QUESTIONS[q % len(QUESTIONS)] + ("" if q < len(QUESTIONS) else f" ({q})")
            ttft, prompt, prefilled = ask(s["payload"], question)
            ttfts.append(ttft)
            computed.append(prefilled)
            prompts.append(prompt)
            print(f"  question {q + 1}: TTFT {ttft:.3f} s, {prefilled} of {prompt} prompt tokens computed", flush=True)
        s.update(ttfts=ttfts, computed=computed, prompts=prompts, front=s["decode_s"] + s["preprocess_s"])
        s["first"] = s["front"] + s["tower_s"] + ttfts[0]
        s["total"] = s["first"] + sum(ttfts[1:])
        if mono is not None:
            print(f"round {r + 1}: monolithic ...", flush=True)
            s["m1"] = s["front"] + mono_ttft(s["inputs"], QUESTIONS[0])
            print(f"  question 1: clip bytes -> first token {s['m1']:.3f} s", flush=True)
            s["m_last"] = mono_ttft(s["inputs"], QUESTIONS[(last - 1) % len(QUESTIONS)])
            print(f"  question {last}: TTFT {s['m_last']:.3f} s", flush=True)
            s["m_total"] = s["m1"] + (last - 1) * s["m_last"]
        rounds.append(s)

    def med(key, index=None):
        values = [(r[key][index] if index is not None else r[key]) for r in rounds]
        return statistics.median(values), min(values)

    s = rounds[0]
    clip, inputs = s["clip"], s["inputs"]
    t, h, w_ = inputs.grid_thw
    tokens = t * h * w_ // encoder.video.merge_size ** 2
    print()
    print(f"{Path(model).name} ({family.model_type}), {choice.name} ({choice.reason}), torch threads "
          f"{torch.get_num_threads()}")
    print(f"CPU: {machine()}")
    print(f"clip: {args.seconds:g} s {args.size}x{args.size} h264 at {args.fps} fps, "
          f"{statistics.mean(len(c) for c in clips) / 1e6:.2f} MB, {clip.total_frames} frames; sampled "
          f"{len(clip.indices)} at {sampling.fps:g} fps, resized to {clip.frames.shape[3]}x{clip.frames.shape[2]}: "
          f"grid {list(inputs.grid_thw)}, {tokens} clip tokens, a {s['prompts'][0]}-token prompt")
    print(f"median of {args.rounds} round(s), each on another clip (min in brackets)")
    print()
    mono_on = mono is not None
    rows = [("decode + sample (read_clip)", med("decode_s"), None),
            ("preprocess (patches)", med("preprocess_s"), None),
            ("vision tower (encode_inputs)", med("tower_s"), None),
            ("question 1: decoder TTFT (clip prefill)", med("ttfts", 0), None),
            ("question 1: clip bytes -> first token", med("first"), med("m1") if mono_on else None),
            (f"question {last}: TTFT (prefix cache hit)", med("ttfts", -1), med("m_last") if mono_on else None),
            (f"{last} questions, first tokens (sum)", med("total"), med("m_total") if mono_on else None)]

    def cell(value) -> str:
        return f"{value[0]:.3f} ({value[1]:.3f})" if value is not None else ""

    print(f"| {'step':<42} | {'split, s':>17} | {'monolithic, s':>17} | {'monolithic / split':>18} |")
    print(f"|{'-' * 44}|{'-' * 18}:|{'-' * 18}:|{'-' * 19}:|")
    for name, ours, theirs in rows:
        ratio = f"{theirs[0] / ours[0]:.1f}x" if theirs is not None and ours[0] > 0 else ""
        print(f"| {name:<42} | {cell(ours):>17} | {cell(theirs):>17} | {ratio:>18} |")
    print()
    if mono_on and last > 2:
        print(f"monolithic questions {'2' if last == 3 else f'2..{last - 1}'} are counted at question {last}'s time (not run: no cache, the "
              "same work); its decode + preprocess is ours, counted once")
    print(f"prompt tokens computed: {s['computed'][0]} of {s['prompts'][0]} (question 1; the system prompt's blocks "
          f"were cached by the warm-up), {s['computed'][-1]} of {s['prompts'][-1]} (question {last})")
    if last > 1:
        later = [x for r in rounds for x in r["ttfts"][1:]]
        print(f"median TTFT of questions 2..{last}: {statistics.median(later):.3f} s")
    print(f"models loaded in {load_s:.1f} s; whole run {time.perf_counter() - wall:.0f} s")
    decoder.close()


if __name__ == "__main__":
    main()
