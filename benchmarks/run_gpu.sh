#!/usr/bin/env bash
# One command for the GPU measurements of Stable LM 2 1.6B at sequence 4096 on one GPU (TP=1):
#   bash benchmarks/run_gpu.sh            (from the repository root; writes benchmarks/out/)
# Needs torch with CUDA, triton, transformers and megatron-core (flash-attn optional: without it the
# SDPA flash backend is used). MICRO_BATCH / STEPS can be set in the environment.
# On a machine that lacks deepspeed/megatron-core (e.g. a lent GPU box with only torch, triton and
# transformers): fetch their wheels where pip works (`../shared/gpu/fetch-wheels.sh` puts them in .whl/),
# bring .whl along, then `python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
# export PYTHONPATH=/tmp/site:$PWD` before this script.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
MB=${MICRO_BATCH:-4}
STEPS=${STEPS:-10}
mkdir -p "$OUT"
CFG=configs/stablelm-2-1_6b.yml
COMMON=(--seq-length 4096 --micro-batch "$MB" --steps "$STEPS" --warmup 3)
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"

# 1. headline: our model vs transformers (same weights, batch, AdamW), no activation recompute
python tools/benchmark.py "$CFG" "${COMMON[@]}" --recompute none --vs-hf --json "$OUT/1_6b_vs_hf.json" | tee "$OUT/1_6b_vs_hf.txt"
# 2. the config as published (full activation recompute) and with packed documents (varlen / flex)
python tools/benchmark.py "$CFG" "${COMMON[@]}" --json "$OUT/1_6b_recompute.json" | tee "$OUT/1_6b_recompute.txt"
python tools/benchmark.py "$CFG" "${COMMON[@]}" --recompute none --documents 4 --json "$OUT/1_6b_docs4.json" | tee "$OUT/1_6b_docs4.txt"
# 3. element-wise kernels: reference instead of Triton (A/B of the fused kernels end to end)
MEGATRON_STABLELM_KERNELS=reference python tools/benchmark.py "$CFG" "${COMMON[@]}" --recompute none \
    --json "$OUT/1_6b_reference_kernels.json" | tee "$OUT/1_6b_reference_kernels.txt"
# 4. per-kernel alternatives (eager / torch.compile / Triton / liger if installed)
python benchmarks/kernels_bench.py | tee "$OUT/kernels.txt"
# 5. profile of the headline step: top ops by CUDA time + Chrome trace
python tools/benchmark.py "$CFG" "${COMMON[@]}" --recompute none --steps 3 --profile "$OUT/profile" > "$OUT/profile.txt"
# 6. kernel/attention agreement tests natively on the GPU
python -m pytest -q tests/test_kernels_triton.py tests/test_attention.py | tee "$OUT/gpu_tests.txt"
echo "results in $OUT; copy the figures into benchmarks/RESULTS.md"
