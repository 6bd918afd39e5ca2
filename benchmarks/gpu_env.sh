#!/usr/bin/env bash
# Environment for benchmarks/gpu.py on a machine without network access (the GPU device).
#
# Installs the wheels carried in ./.whl (timm, mmengine, mmsegmentation, mmcv built without its compiled ops, and
# their pure-Python needs) into /tmp/site and stubs mmcv's compiled-ops module `mmcv._ext`: mmsegmentation imports
# mmcv.ops when its models are imported, but none of the benchmarked modules calls a compiled op; every stubbed
# function raises a clear error if one ever is. gpu.py records the stub in its report.
#
# Usage (source it, or chain it so the exports reach python):
#     . benchmarks/gpu_env.sh && python3 benchmarks/gpu.py --out "$OUT"
#     bash benchmarks/gpu_env.sh --check            # install, then print the versions python sees
# (`bash gpu_env.sh && python3 ...` would lose the PYTHONPATH export: source it.)
# GPU_ENV_SITE (default /tmp/site) and PYTHON (default python3) override the target folder and interpreter.
SITE=${GPU_ENV_SITE:-/tmp/site}
PY=${PYTHON:-python3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if ! ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
    echo "gpu_env.sh: no wheels in $ROOT/.whl (carry the .whl folder)" >&2
    return 1 2>/dev/null || exit 1
fi
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$ROOT"/.whl/*.whl \
    || { echo "gpu_env.sh: wheel install failed" >&2; return 1 2>/dev/null || exit 1; }
cat > "$SITE/mmcv/_ext.py" <<'PY'
"""Stub of mmcv's compiled ops (mmcv built with MMCV_WITH_OPS=0), written by benchmarks/gpu_env.sh."""
STUBBED = True


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)

    def op(*args, **kwargs):
        raise RuntimeError(f"mmcv compiled op {name!r} is stubbed in this environment (benchmarks/gpu_env.sh): "
                           "install mmcv with its ops to use it")
    op.__name__ = name
    return op
PY
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ "${1:-}" = "--check" ]; then
    "$PY" -c "import torch, timm, mmcv, mmengine, mmseg, mmseg.models, kim_plugins.mmseg; \
print('torch', torch.__version__, 'timm', timm.__version__, 'mmcv', mmcv.__version__, 'mmengine', \
mmengine.__version__, 'mmseg', mmseg.__version__, 'kim_plugins', kim_plugins.__file__)"
fi
