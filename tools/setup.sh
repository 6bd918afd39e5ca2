#!/usr/bin/env bash
# One-command set-up of the kim_plugins stack on a CPU (or GPU) machine with Python 3.11.
#
#   bash tools/setup.sh            # create/refresh .venv and install everything
#
# Idempotent: every step checks whether its result is already there. The only
# slow step, building mmcv 2.1.0 with its compiled ops (~11 min on 2 cores), runs
# once per machine; the wheel is kept in $KIM_WHEEL_CACHE (default
# ~/.cache/kim_plugins/wheels) and reused afterwards.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${KIM_VENV:-$ROOT/.venv}"
PYTHON_BIN="${KIM_PYTHON:-python3.11}"
WHEEL_CACHE="${KIM_WHEEL_CACHE:-$HOME/.cache/kim_plugins/wheels}"

TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
TIMM_VERSION=1.0.31
MMENGINE_VERSION=0.10.7
MMCV_VERSION=2.1.0
MMSEG_VERSION=1.2.2

step() { printf '\n[setup] == %s\n' "$*"; }
fail() { printf '\n[setup] FAILED at step: %s\n' "$CURRENT_STEP" >&2; exit 1; }
CURRENT_STEP="start"
trap fail ERR

have_pkg() {  # have_pkg NAME VERSION -> 0 when NAME==VERSION is installed in the venv
  "$VENV/bin/python" - "$1" "$2" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    v = version(sys.argv[1])
except PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if v.split('+')[0] == sys.argv[2] else 1)
PY
}
PIP() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }

CURRENT_STEP="virtual environment ($VENV)"
step "$CURRENT_STEP"
if [ ! -x "$VENV/bin/python" ]; then
  command -v "$PYTHON_BIN" >/dev/null || { echo "[setup] $PYTHON_BIN not found: install Python 3.11 or set KIM_PYTHON" >&2; exit 1; }
  "$PYTHON_BIN" -m venv "$VENV"
else
  echo "[setup] reusing $VENV"
fi

CURRENT_STEP="build tools (pip, setuptools>=77,<81, wheel)"
step "$CURRENT_STEP"
if ! "$VENV/bin/python" -c "import setuptools, wheel, sys; v=tuple(int(x) for x in setuptools.__version__.split('.')[:1]); sys.exit(0 if 77 <= v[0] < 81 else 1)" 2>/dev/null; then
  PIP install -q "setuptools>=77,<81" wheel
else
  echo "[setup] already present"
fi

CURRENT_STEP="torch $TORCH_VERSION + torchvision $TORCHVISION_VERSION"
step "$CURRENT_STEP"
if have_pkg torch $TORCH_VERSION && have_pkg torchvision $TORCHVISION_VERSION; then
  echo "[setup] already present"
else
  PIP install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi

CURRENT_STEP="timm, mmengine and pure-Python dependencies"
step "$CURRENT_STEP"
PIP install -q "timm==$TIMM_VERSION" "mmengine==$MMENGINE_VERSION" \
  ftfy regex "pytest>=7" matplotlib scipy tqdm ninja psutil 2>&1 | grep -v "already satisfied" || true
have_pkg timm $TIMM_VERSION && have_pkg mmengine $MMENGINE_VERSION

CURRENT_STEP="mmcv $MMCV_VERSION with compiled ops"
step "$CURRENT_STEP"
if have_pkg mmcv $MMCV_VERSION && "$VENV/bin/python" -c "import mmcv._ext" 2>/dev/null; then
  echo "[setup] already present (mmcv._ext imports)"
else
  mkdir -p "$WHEEL_CACHE"
  TORCH_TAG=$("$VENV/bin/python" -c "import torch; print(torch.__version__.split('+')[0])")
  WHEEL_DIR="$WHEEL_CACHE/torch$TORCH_TAG"
  mkdir -p "$WHEEL_DIR"
  if ! ls "$WHEEL_DIR"/mmcv-$MMCV_VERSION-*.whl >/dev/null 2>&1; then
    echo "[setup] no cached mmcv wheel for torch $TORCH_TAG in $WHEEL_DIR: building from source (about 11 minutes on 2 cores)"
    BUILD=$(mktemp -d)
    PIP download -q --no-deps --no-binary :all: "mmcv==$MMCV_VERSION" -d "$BUILD"
    tar -xzf "$BUILD"/mmcv-$MMCV_VERSION.tar.gz -C "$BUILD"
    # torch >= 2.10 headers require C++20; mmcv 2.1.0 asks for C++14/17.
    sed -i -e 's/-std=c++14/-std=c++20/g' -e 's/-std=c++17/-std=c++20/g' "$BUILD/mmcv-$MMCV_VERSION/setup.py"
    # mmcv's setup.py imports pkg_resources: build without isolation in this venv (setuptools<81).
    ( cd "$BUILD/mmcv-$MMCV_VERSION" && MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
        "$VENV/bin/python" -m pip wheel --no-build-isolation --no-deps -w "$WHEEL_DIR" . )
    rm -rf "$BUILD"
  else
    echo "[setup] using cached wheel $(ls "$WHEEL_DIR"/mmcv-$MMCV_VERSION-*.whl)"
  fi
  PIP install -q --no-deps --force-reinstall "$WHEEL_DIR"/mmcv-$MMCV_VERSION-*.whl
  PIP install -q addict packaging pyyaml yapf opencv-python-headless 2>&1 | grep -v "already satisfied" || true
  "$VENV/bin/python" -c "import mmcv._ext, mmcv.ops; print('[setup] mmcv', mmcv.__version__, 'ops OK')"
fi

CURRENT_STEP="mmsegmentation $MMSEG_VERSION"
step "$CURRENT_STEP"
if have_pkg mmsegmentation $MMSEG_VERSION; then
  echo "[setup] already present"
else
  PIP install -q --no-deps "mmsegmentation==$MMSEG_VERSION"
  PIP install -q prettytable scipy 2>&1 | grep -v "already satisfied" || true
fi

CURRENT_STEP="kim_plugins (editable)"
step "$CURRENT_STEP"
# Checked from / so that the source tree on sys.path cannot pass for an installation.
# setup.py's hash is kept in the venv, so a changed setup.py (new console scripts) reinstalls.
SETUP_HASH="$(sha256sum "$ROOT/setup.py" | cut -d' ' -f1)"
if [ "$(cd / && "$VENV/bin/python" -c 'import kim_plugins, os; print(os.path.dirname(os.path.dirname(kim_plugins.__file__)))' 2>/dev/null)" = "$ROOT" ] \
   && [ "$(cat "$VENV/.kim_plugins_setup_py.sha256" 2>/dev/null)" = "$SETUP_HASH" ]; then
  echo "[setup] already installed from $ROOT"
else
  PIP install -q --no-deps --no-build-isolation -e "$ROOT"
  echo "$SETUP_HASH" > "$VENV/.kim_plugins_setup_py.sha256"
fi

CURRENT_STEP="Fashion-MNIST (Debian package dataset-fashion-mnist, optional)"
step "$CURRENT_STEP"
if ls /usr/share/datasets/fashion-mnist/*-ubyte.gz >/dev/null 2>&1; then
  echo "[setup] present in /usr/share/datasets/fashion-mnist"
elif command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }) \
    && echo "[setup] installed dataset-fashion-mnist" \
    || echo "[setup] WARNING: could not install dataset-fashion-mnist; the main job will ask for --fashion-mnist DIR"
else
  echo "[setup] not installed (no root apt): install the Debian package dataset-fashion-mnist or pass --fashion-mnist DIR to the main job"
fi

CURRENT_STEP="import check"
step "$CURRENT_STEP"
(cd / && "$VENV/bin/python" - <<'PY'
import sys
import torch, torchvision, timm, mmengine, mmcv, mmseg
import mmcv._ext  # noqa: F401  compiled ops
import kim_plugins
print(f"[setup] python {sys.version.split()[0]} torch {torch.__version__} torchvision {torchvision.__version__} "
      f"timm {timm.__version__} mmengine {mmengine.__version__} mmcv {mmcv.__version__} mmseg {mmseg.__version__}")
PY
)
trap - ERR
echo "[setup] done: activate with 'source $VENV/bin/activate'"
