#!/bin/sh
# Install one vlsplit image's Python environment into a fresh venv. The Dockerfile runs exactly this,
# and tests/test_packaging.py runs it too, so the gateway's no-torch install is tested as it ships.
#   docker/install.sh gateway VENV   pinned base install: gateway + client commands, no torch
#   docker/install.sh model VENV     + the model stack and torch from $TORCH_INDEX (CPU or CUDA wheels)
# Run from the repository root (or the build context holding pyproject.toml, vlsplit/, shared/, services/).
set -eu
kind=${1:?usage: docker/install.sh gateway|model VENV}
venv=${2:?usage: docker/install.sh gateway|model VENV}
python=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

case "$kind" in
  gateway|model) ;;
  *) echo "docker/install.sh: unknown kind '$kind' (gateway|model)" >&2; exit 2 ;;
esac

"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --requirement "docker/requirements/$kind.txt"
if [ "$kind" = model ]; then
  # After the pinned requirements, so torch's own dependencies are already the pinned ones.
  "$venv/bin/pip" install --quiet --index-url "${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" \
    "torch==${TORCH_VERSION:-2.13.0}"
fi
# vlsplit itself; its dependencies are all in the pinned file above.
"$venv/bin/pip" install --quiet --no-deps .
