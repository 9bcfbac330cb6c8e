#!/bin/sh
# Install one vlsplit image's Python environment into a fresh venv. The Dockerfile runs exactly this,
# and tests/test_packaging.py runs it too, so the gateway's no-torch install is tested as it ships.
#   docker/install.sh gateway VENV   pinned vlsplit[gateway]: gateway + client commands, no torch
#   docker/install.sh model VENV     pinned vlsplit[model]: encoder/decoder, torch from $TORCH_INDEX (CPU or CUDA)
#   docker/install.sh client VENV    pinned `pip install vlsplit`: the SDK and the client commands (no image;
#                                    tests/test_packaging.py shows what it holds)
# Run from the repository root (or the build context holding pyproject.toml, vlsplit/, shared/, services/).
set -eu
kind=${1:?usage: docker/install.sh gateway|model|client VENV}
venv=${2:?usage: docker/install.sh gateway|model|client VENV}
python=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

case "$kind" in
  gateway|model|client) ;;
  *) echo "docker/install.sh: unknown kind '$kind' (gateway|model|client)" >&2; exit 2 ;;
esac

"$python" -m venv "$venv"
if [ "$kind" = client ]; then
  # The base distribution's own dependencies, at the gateway image's pins.
  "$venv/bin/pip" install --quiet --constraint docker/requirements/gateway.txt .
  exit 0
fi
"$venv/bin/pip" install --quiet --requirement "docker/requirements/$kind.txt"
if [ "$kind" = model ]; then
  # After the pinned requirements, so torch's own dependencies are already the pinned ones.
  # TORCH_INDEX="" takes torch from pip's own configured index (a local wheel, say) instead.
  index=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}
  "$venv/bin/pip" install --quiet ${index:+--index-url "$index"} "torch==${TORCH_VERSION:-2.13.0}"
fi
# vlsplit itself; its dependencies are all in the pinned file above.
"$venv/bin/pip" install --quiet --no-deps .
