#!/usr/bin/env bash
# One command for the GPU measurements of Stable LM 2 1.6B at sequence 4096 on one GPU (TP=1):
#   bash benchmarks/run_gpu.sh [STEP ...]     (from the repository root; results in benchmarks/out/)
# Steps, in order of importance (default: all): info hf profile cudnn flashce tests reference recompute
# docs kernels. Each step has its own time limit, so one slow or failing step leaves the others' results.
# Needs torch with CUDA, triton, transformers and megatron-core (flash-attn optional: without it the SDPA
# flash backend is used). MICRO_BATCH / STEPS can be set in the environment.
# On a machine that lacks deepspeed/megatron-core (a lent GPU box with only torch, triton and
# transformers): fetch their wheels where pip works (`../shared/gpu/fetch-wheels.sh` puts them in .whl/)
# and bring .whl along; this script installs them into /tmp/site when megatron-core is missing.
set -uo pipefail
cd "$(dirname "$0")/.."
RES=benchmarks/out
MB=${MICRO_BATCH:-4}
STEPS=${STEPS:-10}
PY=${PYTHON:-python3}
mkdir -p "$RES"
# Under the lent-GPU tool ($OUT is fetched back, a few files at most): pack the results into one archive
# after every step, so a run cut off at its time limit still returns what it measured.
pack() {
    [ -n "${OUT:-}" ] || return 0
    tar czf "$OUT/results.tgz" -C "$RES" --exclude=trace.json .
    [ -f "$RES/profile/trace.json" ] && gzip -c "$RES/profile/trace.json" > "$OUT/trace.json.gz"
    return 0
}
trap pack EXIT
export PYTHONUNBUFFERED=1
# the tools import megatron_stablelm: from this checkout even where it is not pip-installed
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! $PY -c "import megatron.core" 2>/dev/null && [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 1

CFG=configs/stablelm-2-1_6b.yml
COMMON=(--seq-length 4096 --micro-batch "$MB" --steps "$STEPS" --warmup 3)
bench() {  # bench NAME LIMIT_S [ARGS...]: one benchmark.py run, report in $RES/NAME.{txt,json}
    local name=$1 limit=$2
    shift 2
    echo "=== $name"
    timeout "$limit" $PY tools/benchmark.py "$CFG" "${COMMON[@]}" --json "$RES/$name.json" "$@" 2>&1 \
        | tee "$RES/$name.txt" | grep -E "^(attention|kernels|framework|transformers|speedup|matmul|Traceback|\w*Error)"
    pack
}
want() { [ -z "$STEPS_WANTED" ] || [[ " $STEPS_WANTED " == *" $1 "* ]]; }
STEPS_WANTED="$*"

if want info; then
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv | tee "$RES/info.txt"
    $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'cudnn', torch.backends.cudnn.version())" | tee -a "$RES/info.txt"
fi
# 1. headline: our model vs transformers (same weights, batch, AdamW), no activation recompute
want hf && bench 1_6b_vs_hf 240 --recompute none --vs-hf
# 2. profile of the headline step: top ops by CUDA time + Chrome trace
if want profile; then
    echo "=== profile"
    timeout 150 $PY tools/benchmark.py "$CFG" "${COMMON[@]}" --recompute none --steps 2 --warmup 1 \
        --profile "$RES/profile" > "$RES/profile.txt" 2>&1
    pack
    grep -E "Self CUDA time total|Self CPU time total" "$RES/profile/top_ops.txt"
fi
# 3. A/B: SDPA restricted to cuDNN attention; the fused LM head + loss (use_flash_cross_entropy)
want cudnn && bench 1_6b_cudnn 150 --recompute none --sdpa-backend cudnn
want flashce && bench 1_6b_flash_ce 150 --recompute none --override use_flash_cross_entropy=true
# 4. kernel/attention agreement tests natively on the GPU
if want tests; then
    echo "=== tests"
    timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py tests/test_attention.py -k "${TESTS_K:-}" \
        2>&1 | tee "$RES/gpu_tests.txt" | tail -n 15
    pack
fi
# 5. element-wise kernels: PyTorch reference instead of Triton (A/B of the fused kernels end to end)
want reference && MEGATRON_STABLELM_KERNELS=reference bench 1_6b_reference_kernels 150 --recompute none
# 6. the config as published (full activation recompute) and with packed documents (varlen / flex)
want recompute && bench 1_6b_recompute 150
want docs && bench 1_6b_docs4 200 --recompute none --documents 4
# 7. per-kernel alternatives (eager / torch.compile / Triton / liger)
if want kernels; then
    echo "=== kernels"
    timeout 240 $PY benchmarks/kernels_bench.py 2>&1 | tee "$RES/kernels.txt"
fi
echo "results in $RES; copy the figures into benchmarks/RESULTS.md"
