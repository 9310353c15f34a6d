#!/usr/bin/env bash
# Install ctcvr and its pinned stack into a virtual environment. Idempotent: a second run with an
# up-to-date environment only re-checks it. Used by the Makefile, the Dockerfile and CI alike.
#
#   bash deploy/install.sh            # venv at .venv: everything, editable, with the test tools
#   VENV=/opt/venv EXTRAS=train,serve EDITABLE=0 bash deploy/install.sh  # the trainer image
#   VENV=/opt/venv EXTRAS=serve EDITABLE=0 bash deploy/install.sh        # the server image
#
# Environment:
#   VENV             where the virtual environment goes (default: .venv beside this repo)
#   PYTHON           interpreter used to create it (default: python3.11, else python3)
#   EXTRAS           which install sets of pyproject.toml (its extras) to install, comma-separated:
#                    serve (the scoring service), train (the TorchRec trainer: fbgemm-gpu-cpu and
#                    torchrec come with it), bench (plotting), dev (test tools); the base set
#                    (torch, numpy, pyarrow, pydantic, safetensors, storage) always
#                    (default: train,serve,bench,dev)
#   EDITABLE         1 installs the package editable (default), 0 as a regular install
#   TORCH_VARIANT    cpu (default), or a CUDA tag of PyTorch's package index such as cu128: the
#                    CUDA build of torch and fbgemm-gpu (instead of fbgemm-gpu-cpu)
#   TORCH_INDEX_URL  where torch (and, on CUDA, fbgemm-gpu) come from when not available locally
#                    (default: PyTorch's own index for TORCH_VARIANT, .../whl/cpu or .../whl/cu128)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$repo/.venv}"
extras="${EXTRAS-train,serve,bench,dev}"
editable="${EDITABLE:-1}"
variant="${TORCH_VARIANT:-cpu}"
torch_index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/$variant}"

# The versions below are the verified stack (see README "Dependencies"); pyproject.toml pins the
# rest. torchrec is installed without its declared dependencies because it names fbgemm-gpu, the
# CUDA build, which must never sit beside fbgemm-gpu-cpu.
TORCH_VERSION=2.13.0
FBGEMM_VERSION=1.8.0
TORCHREC_VERSION=1.8.0

python_bin="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [[ ! -x "$venv/bin/python" ]]; then
  echo "[install] creating virtual environment at $venv"
  "$python_bin" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install --quiet --upgrade "pip>=24" wheel

installed_version() {
  "$venv/bin/python" - "$1" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    print(version(sys.argv[1]))
except PackageNotFoundError:
    print("")
PY
}

# The build is named by the wheel's local version label: 2.13.0+cpu, 2.13.0+cu128.
if [[ "$(installed_version torch)" != "$TORCH_VERSION+$variant" ]]; then
  # A plain `pip install torch` would fetch the multi-GB CUDA build: take the wanted build from a
  # local wheel directory if pip is configured with one, otherwise from PyTorch's index.
  echo "[install] torch==$TORCH_VERSION+$variant"
  # --no-deps here: torch's own dependencies come from PyPI in the steps below.
  "${pip[@]}" install --quiet --no-index --no-deps "torch==$TORCH_VERSION+$variant" 2>/dev/null \
    || "${pip[@]}" install --quiet --index-url "$torch_index" "torch==$TORCH_VERSION+$variant"
fi

# The trainer's TorchRec stack only with the train set (the server image has none of it).
with_train=0
[[ ",$extras," == *,train,* ]] && with_train=1
if [[ "$with_train" == 1 ]]; then
  if [[ "$variant" == cpu ]]; then
    echo "[install] fbgemm-gpu-cpu==$FBGEMM_VERSION, torchrec==$TORCHREC_VERSION (--no-deps)"
    "${pip[@]}" install --quiet "torch==$TORCH_VERSION" "fbgemm-gpu-cpu==$FBGEMM_VERSION"
  fi
  "${pip[@]}" install --quiet --no-deps "torchrec==$TORCHREC_VERSION"
fi

target="$repo"
[[ -n "$extras" ]] && target="$repo[$extras]"
echo "[install] ctcvr${extras:+[$extras]} and its pinned dependencies"
if [[ "$editable" == "1" ]]; then
  "${pip[@]}" install --quiet "torch==$TORCH_VERSION" -e "$target"
else
  "${pip[@]}" install --quiet "torch==$TORCH_VERSION" "$target"
fi

if [[ "$variant" != cpu && "$with_train" == 1 ]]; then
  # pyproject.toml names fbgemm-gpu-cpu; on CUDA its GPU build replaces it. Both install the same
  # fbgemm_gpu module, so the CPU one goes first and the GPU one is (re)installed over clean files.
  echo "[install] fbgemm-gpu==$FBGEMM_VERSION ($variant) in place of fbgemm-gpu-cpu"
  "${pip[@]}" uninstall --quiet -y fbgemm-gpu-cpu
  "${pip[@]}" install --quiet --force-reinstall --no-deps --index-url "$torch_index" \
    "fbgemm-gpu==$FBGEMM_VERSION"
fi

check="import torch, pyarrow, safetensors"
[[ "$with_train" == 1 ]] && check+=", torchrec, fbgemm_gpu"
[[ ",$extras," == *,serve,* ]] && check+=", fastapi, uvicorn"
"$venv/bin/python" -c "$check; print(f'[install] ok ($extras): torch {torch.__version__}')"
