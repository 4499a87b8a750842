#!/usr/bin/env bash
# The prepared GPU check for the train and compress families (one call on a lent GPU machine, whose image has
# torch and transformers but no SmolLM2 weights): every train and compress method on CUDA in fp32 and bf16, then
# exact vs randomized SVD time and the peak memory of streaming calibration on SmolLM2's architecture (random
# weights; carry .gpu with SmolLM2's config.json:
#   mkdir -p .gpu/smollm2 && cp ~/.cache/subspaces/models/smollm2-135m-instruct/config.json .gpu/smollm2/ ).
set -uo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout 300 python3 -m pytest -p no:cacheprovider -o addopts="" -q -p no:warnings tests/test_devices.py \
  -k "cuda and (train_method or compress_method)" 2>&1 | tail -25 | tee "$OUT/tests.log"
timeout 200 python3 benchmarks/compress_smollm2.py --timing --config .gpu/smollm2/config.json --device cuda \
  --calib 64 --seq 512 --json "$OUT/compress_timing_cuda.json" --md "$OUT/compress_timing_cuda.md" 2>&1 | tail -15
