"""The model services' allocator (shared/allocator.py): the environment `vlsplit serve` re-executes
with, and a real re-executed process running under it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared import allocator

ROOT = Path(__file__).resolve().parent.parent


def test_auto_prefers_tcmalloc_and_falls_back_to_tuned_glibc(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
    env, applied = allocator.environment("auto", {"PATH": "/bin"})
    assert env["LD_PRELOAD"].endswith("libtcmalloc_minimal.so.4") and applied.startswith("tcmalloc")
    assert env[allocator.MARK] == applied and env["PATH"] == "/bin"
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    env, applied = allocator.environment("auto", {"GLIBC_TUNABLES": "glibc.pthread.rseq=0"})
    assert env["GLIBC_TUNABLES"] == "glibc.pthread.rseq=0:" + allocator.GLIBC_TUNABLES and applied.startswith("glibc")
    with pytest.raises(RuntimeError, match="VLSPLIT_ALLOCATOR=tcmalloc but no libtcmalloc is installed"):
        allocator.environment("tcmalloc", {})


def test_no_reexec_when_applied_chosen_or_system():
    assert allocator.environment("auto", {allocator.MARK: "glibc"}) == (None, "glibc")  # never loops
    assert allocator.environment("system", {}) == (None, "system")
    env, applied = allocator.environment("auto", {"LD_PRELOAD": "/opt/libjemalloc.so.2"})
    assert env is None and "jemalloc" in applied  # the user's own choice stays
    with pytest.raises(ValueError, match="VLSPLIT_ALLOCATOR='mimalloc': expected one of auto, tcmalloc, glibc"):
        allocator.environment("mimalloc", {})


SCRIPT = """
import sys
from shared import allocator
print("applied:", allocator.reexec(sys.argv[1]))
print("maps-tcmalloc:", "tcmalloc" in open("/proc/self/maps").read())
"""


@pytest.mark.parametrize("choice", ["auto", "glibc", "system"])
def test_a_process_reexecutes_under_the_allocator(choice):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.MARK)}
    out = subprocess.run([sys.executable, "-c", SCRIPT, choice], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    tcmalloc = allocator.find_tcmalloc()
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines())
    if choice == "system":
        assert lines == {"applied": "system", "maps-tcmalloc": "False"}
    elif choice == "auto" and tcmalloc:
        assert lines == {"applied": f"tcmalloc ({tcmalloc})", "maps-tcmalloc": "True"}  # really loaded
    else:
        assert lines == {"applied": "glibc (mmap and trim thresholds raised)", "maps-tcmalloc": "False"}


def test_an_openvino_process_never_gets_tcmalloc_under_auto(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
    env, applied = allocator.environment("auto", {}, openvino=True)
    assert "LD_PRELOAD" not in env and env["GLIBC_TUNABLES"] == allocator.GLIBC_TUNABLES and applied.startswith("glibc")
