#!/usr/bin/env bash
# The reference environment for `make test-video-reference`: the official transformers video processors
# (Qwen2VLVideoProcessor, Qwen3VLVideoProcessor) import torchvision, which does not import beside .venv's
# CPU torch 2.13 wheel. So they run here, in .cache/video-reference/venv, beside a torch/torchvision pair
# that import together, and tests/video_reference compares shared/video.py against them.
#
# Idempotent: a stamp file records what was installed; a second run with the same versions does nothing.
# Versions: torch/torchvision as below (a CUDA build of several GB: it imports and runs on the CPU, and the
# pair is installed first so nothing else pulls a different torch); transformers the same as .venv's.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
DIR=.cache/video-reference
VENV=$DIR/venv
TORCH_VERSION=${VIDEO_REF_TORCH_VERSION:-2.14.1}
TORCHVISION_VERSION=${VIDEO_REF_TORCHVISION_VERSION:-0.29.1}
AV_VERSION=${VIDEO_REF_AV_VERSION:-18.1.0}

if [[ -n ${VIDEO_REF_TRANSFORMERS_VERSION:-} ]]; then
    TRANSFORMERS_VERSION=$VIDEO_REF_TRANSFORMERS_VERSION
elif [[ -x .venv/bin/python ]]; then
    TRANSFORMERS_VERSION=$(.venv/bin/python -c 'import transformers; print(transformers.__version__)')
else
    echo "video-reference: .venv is missing (run 'make setup'), or set VIDEO_REF_TRANSFORMERS_VERSION" >&2
    exit 1
fi

WANT="torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION transformers==$TRANSFORMERS_VERSION av==$AV_VERSION src=$ROOT"
STAMP=$VENV/.video-reference-installed
if [[ -f $STAMP && $(cat "$STAMP") == "$WANT" && -x $VENV/bin/python ]]; then
    echo "video-reference: $VENV is up to date ($WANT)"
    exit 0
fi

start=$(date +%s)
echo "video-reference: building $VENV ($WANT)"
mkdir -p "$DIR"
if [[ ! -x $VENV/bin/python ]]; then
    echo "+ $PYTHON -m venv $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

# torch and torchvision first, on their own: everything after resolves against them.
echo "+ pip install torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION"
"${PIP[@]}" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"

echo "+ pip install transformers==$TRANSFORMERS_VERSION av==$AV_VERSION pillow numpy safetensors tokenizers msgpack pytest"
"${PIP[@]}" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" \
    "transformers==$TRANSFORMERS_VERSION" "av==$AV_VERSION" pillow numpy safetensors tokenizers msgpack pytest

# The project's own packages (shared.*, vlsplit.*) resolve from the source tree through a .pth file: no
# install of the project (an editable install would rewrite the egg-info that .venv's install uses).
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "+ echo $ROOT > $SITE/vlsplit-source.pth"
echo "$ROOT" >"$SITE/vlsplit-source.pth"

echo "+ $VENV/bin/python -c 'import torch, torchvision, transformers, av, shared'"
"$VENV/bin/python" -c '
import torch, torchvision, transformers, av, shared
print(f"video-reference: torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"transformers {transformers.__version__}, av {av.__version__}")
'
echo "$WANT" >"$STAMP"
echo "video-reference: done in $(( $(date +%s) - start )) s; $(du -sh "$VENV" | cut -f1) in $VENV"
