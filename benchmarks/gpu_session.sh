#!/usr/bin/env bash
# One prepared session on a lent GPU machine (no network there): the GPU check, then the unit and
# gloo test tiers under that machine's torch (2.11, where this repo's own venv has 2.13).
#
#   OUT=/some/folder bash benchmarks/gpu_session.sh           # on the GPU machine
#   OUT=/tmp/x REHEARSE=1 bash benchmarks/gpu_session.sh      # here, on the CPU, to check the script
#
# The machine's python3 holds torch, rich, matplotlib, numpy and pytest; tyro and its two
# dependencies travel as wheels in .whl/ (pip download, see /work/.library/device/README.md).
set -u
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for the results}"
PY=${PY:-python3}
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  date -u; nproc; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $PY -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.is_available())"
} 2>&1 | tee "$OUT/machine.txt"

if [ -n "${REHEARSE:-}" ]; then
  timeout "${CHECK_S:-400}" $PY benchmarks/gpu_check.py --rehearse --work /tmp/parallab-gpu-check --skip compiled 2>&1 | tee "$OUT/gpu_check.log"
  cp /tmp/parallab-gpu-check/gpu-check-*.json "$OUT/" 2>/dev/null
else
  timeout "${CHECK_S:-400}" $PY benchmarks/gpu_check.py --out "$OUT" 2>&1 | tee "$OUT/gpu_check.log"
fi

# The GPU-marked tests with the GPU visible, then the unit and gloo tiers under this machine's
# torch with the GPU hidden (backend auto would pick NCCL, and several ranks cannot share one GPU).
$PY -m pytest tests -q -m gpu --timeout 120 -p no:cacheprovider 2>&1 | tail -15 > "$OUT/pytest_gpu.log"
echo "pytest (gpu) exit: ${PIPESTATUS[0]}" >> "$OUT/pytest_gpu.log"
XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n ${WORKERS:-12}"
CUDA_VISIBLE_DEVICES="" timeout "${TESTS_S:-150}" $PY -m pytest ${TEST_PATHS:-tests/unit tests/distributed} -v -rfE \
  --maxfail=25 $XDIST --timeout 120 -p no:cacheprovider > "$OUT/pytest.log" 2>&1
echo "pytest exit: $?" >> "$OUT/pytest.log"
tail -n 3 "$OUT/pytest_gpu.log"; grep -E "FAILED|ERROR|passed|failed" "$OUT/pytest.log" | tail -30
