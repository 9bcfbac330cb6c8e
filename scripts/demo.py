"""`make demo`: start the whole stack (`vlsplit up`), ask three questions about the bundled sample
image with `vlsplit ask`, and shut everything down. The first question is a cache miss (the vision
tower runs); the next two are hits (it does not)."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path

from services.launcher import free_port

SAMPLE = Path(__file__).resolve().parent.parent / "docs" / "sample.png"
QUESTIONS = ["What is in this picture?", "What colour is the roof?", "Is it day or night?"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    port = free_port()
    print(f"== vlsplit up: encoder, decoder, gateway and a private Redis (gateway on 127.0.0.1:{port}) ==",
          flush=True)
    up = subprocess.Popen([sys.executable, "-m", "vlsplit.cli", "up", "--model", args.model,
                           "--gateway-port", str(port)], stdout=subprocess.PIPE, text=True)
    try:
        ready = up.stdout.readline()
        if "is up" not in ready:
            print("vlsplit up failed to start", file=sys.stderr)
            return 1
        print(ready, end="", flush=True)
        print(f"\n== vlsplit ask {SAMPLE.name} (three questions; the image is encoded once) ==", flush=True)
        ask = subprocess.run([sys.executable, "-m", "vlsplit.cli", "ask", str(SAMPLE), *QUESTIONS,
                              "--gateway", f"127.0.0.1:{port}", "--max-new-tokens", "24"])
        print("\nThe first answer was a cache [miss]: the vision tower ran. The others were [hit]s: it did not.")
        print("The model has RANDOM weights, so its text is meaningless; the timings are real.")
        print("For real answers: vlsplit up --model /path/to/Qwen2-VL-2B-Instruct, then vlsplit ask IMAGE QUESTION")
        return ask.returncode
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(timeout=60)
        print("== stopped ==")


if __name__ == "__main__":
    sys.exit(main())
