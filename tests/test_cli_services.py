"""`vlsplit up` and `vlsplit ask` as a user runs them: real processes, then Ctrl-C."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil

from procs import free_port
from reference import reference_tokens
from shared.image_ids import image_id
from shared.images import load_image

SAMPLE = Path(__file__).resolve().parent.parent / "docs" / "sample.png"
FIELDS = {"question", "text", "token_ids", "image_id", "cache", "encode_ms", "ttft_ms", "total_ms"}


def test_up_then_ask_json_then_ctrl_c(tiny_models):
    port, http_port = free_port(), free_port()
    up = subprocess.Popen([sys.executable, "-m", "vlsplit.cli", "up", "--model", tiny_models["qwen2_vl"],
                           "--gateway-port", str(port), "--http-port", str(http_port)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = up.stdout.readline()  # blocks until everything is serving
        assert f"gateway on 127.0.0.1:{port}" in line, up.stderr.read() if up.poll() is not None else line
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 4  # redis-server, encoder, decoder, gateway
        out = subprocess.run([sys.executable, "-m", "vlsplit.cli", "ask", str(SAMPLE), "What is this?",
                              "What colour is the roof?", "--json", "--gateway", f"127.0.0.1:{port}",
                              "--max-new-tokens", "8"], check=True, capture_output=True, text=True)
        answers = [json.loads(line) for line in out.stdout.splitlines()]
        assert [a["cache"] for a in answers] == ["miss", "hit"]
        image = load_image(SAMPLE.read_bytes())
        for answer in answers:
            assert FIELDS <= set(answer)
            assert answer["image_id"] == image_id(SAMPLE.read_bytes())
            assert answer["token_ids"] == reference_tokens(tiny_models["qwen2_vl"], [image], answer["question"], 8)
        by_id = subprocess.run([sys.executable, "-m", "vlsplit.cli", "ask", "--image-id", answers[0]["image_id"],
                                "Is it day?", "--json", "--gateway", f"127.0.0.1:{port}"],
                               check=True, capture_output=True, text=True)
        assert json.loads(by_id.stdout)["cache"] == "hit"
        classified = subprocess.run([sys.executable, "-m", "vlsplit.cli", "classify", str(SAMPLE), "Is it day?",
                                     "--labels", "yes,no,maybe", "--json", "--gateway", f"127.0.0.1:{port}"],
                                    check=True, capture_output=True, text=True)
        result = json.loads(classified.stdout)
        assert sorted(label["label"] for label in result["labels"]) == ["maybe", "no", "yes"]
        assert abs(sum(label["prob"] for label in result["labels"]) - 1) < 1e-6
        assert result["labels"][0]["logprob"] >= result["labels"][-1]["logprob"]
        chat = subprocess.run([sys.executable, "-m", "vlsplit.cli", "chat", "--gateway", f"127.0.0.1:{port}",
                               "--max-new-tokens", "8", "--system", "Be brief."],
                              input=f"/image {SAMPLE}\nWhat is this?\nAnd the roof?\n/quit\n",
                              check=True, capture_output=True, text=True)
        turns = [line for line in chat.stdout.splitlines() if line.startswith("assistant> ")]
        assert len(turns) == 2 and "[hit]" in chat.stdout  # the second turn reuses the image
        page = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/", timeout=10).read().decode()
        assert "<html" in page.lower()
        for service, code, status in (("", 0, "SERVING"), ("vlsplit.v1.Gateway", 0, "SERVING"),
                                      ("no.such.Service", 1, "NOT_FOUND")):
            health = subprocess.run([sys.executable, "-m", "vlsplit.cli", "health", f"127.0.0.1:{port}",
                                     "--service", service], capture_output=True, text=True)
            assert (health.returncode, health.stdout.strip()) == (code, status)
    finally:
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=90) == 0
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


def test_ask_reports_errors_without_traceback():
    out = subprocess.run([sys.executable, "-m", "vlsplit.cli", "ask", str(SAMPLE), "hi", "--gateway",
                          f"127.0.0.1:{free_port()}", "--timeout", "3"], capture_output=True, text=True)
    assert out.returncode == 1
    assert "UNAVAILABLE" in out.stderr and "Traceback" not in out.stderr
    health = subprocess.run([sys.executable, "-m", "vlsplit.cli", "health", f"127.0.0.1:{free_port()}",
                             "--timeout", "1"], capture_output=True, text=True)
    assert (health.returncode, health.stdout.strip()) == (1, "UNAVAILABLE")


def test_up_fails_at_once_when_a_service_exits_before_serving(tmp_path):
    """A checkpoint the encoder cannot load: `vlsplit up` says which service exited and stops, without
    waiting out its ready timeout (600 s)."""
    (tmp_path / "config.json").write_text("{}")  # not a Qwen-VL checkpoint
    port = free_port()
    up = subprocess.run([sys.executable, "-m", "vlsplit.cli", "up", "--model", str(tmp_path), "--redis", "memory",
                         "--gateway-port", str(port), "--http-port", "-1"], capture_output=True, text=True,
                        timeout=120)
    assert up.returncode != 0
    assert "exited with" in up.stderr and ("encoder" in up.stderr or "decoder" in up.stderr), up.stderr[-2000:]


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range():
    """`vlsplit up` (and the tests) pick ports for servers they start next: none handed out twice, none
    where an outgoing connection's source port could take it first."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(1024 <= p < low for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))
