#!/usr/bin/env bash
# What ran on the lent GPU machine (torch, timm, torchvision preinstalled; no network): fastai and its pure-Python
# dependencies come as wheels in .whl/ (fastprogress 1.0.3, which needs no fasthtml), the package from the checkout.
# Writes the test log and the CUDA benchmark report to $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 IPYTHONDIR=/tmp/ipy MPLCONFIGDIR=/tmp/mpl
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, fastai, timm, torchvision; print('torch', torch.__version__, 'fastai', fastai.__version__, 'timm', timm.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  start=$(date +%s)
  python3 -m pytest -q -rs -n 8 -p no:cacheprovider ${PYTEST_ARGS:-tests} > "$OUT/pytest.log" 2>&1; echo "pytest rc $? in $(( $(date +%s) - start ))s"
  tail -25 "$OUT/pytest.log"
fi
python3 bench/mix_bench.py --device cuda --resnet ${BENCH_ARGS:-} --out "$OUT/cuda" > "$OUT/bench.log" 2>&1; echo "bench rc $?"
tail -60 "$OUT/bench.log"
