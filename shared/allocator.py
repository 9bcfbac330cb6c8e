"""The memory allocator of the model services: tcmalloc where the machine has it, else glibc tuned.

A forward allocates and frees tensors of tens of MB each (a prefill chunk's MLP activations are
1,405 x 8,960 values). glibc's malloc serves blocks that large with a fresh `mmap` and returns them
with `munmap` on free, so every such tensor pays its page faults again: on the 2-core AMX VM,
`silu(a) * b` over [1405, 8960] bf16 takes 16.6 ms with glibc's defaults, 8.6 ms with its mmap and
trim thresholds raised, 8.5 ms under tcmalloc; the bench image prompt's prefill 0.62 s, 0.56 s and
0.49 s (`bench/prefill.py`). vLLM's CPU build preloads tcmalloc for the same reason.

The allocator is chosen when the process starts, so `vlsplit serve encoder|decoder` re-executes
itself once, before torch is imported, with `LD_PRELOAD` naming tcmalloc (`auto`, when a
libtcmalloc is installed: Debian/Ubuntu `libtcmalloc-minimal4`, in the model images) or with
`GLIBC_TUNABLES` raising glibc's thresholds (`auto` without tcmalloc, or `glibc`). `system` leaves
the process as it is. `VLSPLIT_ALLOCATOR` (or `--allocator`) sets it. An encoder on the OpenVINO
backend takes glibc under `auto`: OpenVINO's runtime aborted ("double free or corruption") with
tcmalloc preloaded.
"""

from __future__ import annotations

import ctypes.util
import glob
import os
import sys

CHOICES = ("auto", "tcmalloc", "glibc", "system")
MARK = "VLSPLIT_ALLOCATOR_APPLIED"  # set in the re-executed process: never loop
# glibc: blocks up to 4 GiB come from the heap (no mmap per tensor), and freed memory is kept
GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"
TCMALLOC_GLOBS = ("/usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/*-linux-gnu/libtcmalloc.so.4",
                  "/usr/lib64/libtcmalloc_minimal.so.4", "/usr/lib64/libtcmalloc.so.4",
                  "/usr/local/lib/libtcmalloc_minimal.so*", "/usr/local/lib/libtcmalloc.so*")


def check_allocator(choice: str) -> None:
    if choice not in CHOICES:
        raise ValueError(f"VLSPLIT_ALLOCATOR={choice!r}: expected one of {', '.join(CHOICES)}")


def find_tcmalloc() -> str | None:
    """The path of an installed tcmalloc, or None."""
    for pattern in TCMALLOC_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    name = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
    return name if name and os.path.isabs(name) else None


def environment(choice: str, environ: dict[str, str], openvino: bool = False) -> tuple[dict[str, str] | None, str]:
    """(the environment to re-execute with, or None to go on as is; what the process runs with).
    `openvino`: the process runs OpenVINO, so `auto` never picks tcmalloc."""
    check_allocator(choice)
    if choice == "auto" and openvino:
        choice = "glibc"  # OpenVINO's runtime aborts (double free) with tcmalloc preloaded
    if environ.get(MARK):
        return None, environ[MARK]
    if choice == "system":
        return None, "system"
    preloaded = environ.get("LD_PRELOAD", "")
    if "tcmalloc" in preloaded or "jemalloc" in preloaded:  # the user chose one already
        return None, f"preloaded ({preloaded})"
    tcmalloc = find_tcmalloc() if choice in ("auto", "tcmalloc") else None
    if choice == "tcmalloc" and tcmalloc is None:
        raise RuntimeError("VLSPLIT_ALLOCATOR=tcmalloc but no libtcmalloc is installed "
                           "(apt-get install libtcmalloc-minimal4), or use auto")
    env = dict(environ)
    if tcmalloc:
        env["LD_PRELOAD"] = f"{tcmalloc}:{preloaded}" if preloaded else tcmalloc
        applied = f"tcmalloc ({tcmalloc})"
    else:
        env["GLIBC_TUNABLES"] = f"{environ['GLIBC_TUNABLES']}:{GLIBC_TUNABLES}" if environ.get("GLIBC_TUNABLES") \
            else GLIBC_TUNABLES
        applied = "glibc (mmap and trim thresholds raised)"
    env[MARK] = applied
    return env, applied


def reexec(choice: str, openvino: bool = False) -> str:
    """Re-execute this process under the allocator `choice` names (once); returns what it runs with."""
    env, applied = environment(choice, dict(os.environ), openvino)
    if env is None:
        return applied
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    raise AssertionError("unreachable")  # pragma: no cover


def applied() -> str:
    """What this process runs with, for the start-up log."""
    return os.environ.get(MARK, "system")
