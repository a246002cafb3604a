#!/usr/bin/env bash
# One command for the GPU measurements of Stable LM 2 1.6B at sequence 4096 on one GPU (TP=1):
#   bash benchmarks/run_gpu.sh [STEP ...]     (from the repository root; results in benchmarks/out/, a
#   session's files kept in benchmarks/results/gpu-DATE-DEVICE/)
# Steps, in order of importance (default: all): info hf profile cudnn flashce tests reference recompute
# docs kernels, then the trainer steps (issue 18): trainer_profile trainer_bench layernorm trainer_flashce sdpa_flash trainer_docs
# trainer_docs_flex trainer_docs_profile train train_recompute_large train_norecompute train_varlen resume rerun
# export verdict. The trainer steps run `train.py` through the real `deepspeed` launcher (NCCL, bf16, ZeRO-1,
# synthetic data); the Python half of their checks is benchmarks/gpu_checks.py. `resume` compares with
# `train`'s losses, so run `train` first (the default order does). Each step has its own time limit, so one slow or failing step leaves the others' results.
# Needs torch with CUDA, triton, transformers and megatron-core (flash-attn optional: without it the SDPA
# flash backend is used). MICRO_BATCH / STEPS can be set in the environment.
# DEADLINE_S (seconds, default none): the wall-clock budget of this whole invocation; every step's own
# limit is cut to what is left (5 s kept for packing), and a step with under 30 s left is skipped, so a
# device call never runs past its limit with results unpacked. TEST_FILES picks the `tests` step's files.
# On a machine that lacks deepspeed/megatron-core (a lent GPU box with only torch, triton and
# transformers): fetch their wheels where pip works (`../shared/gpu/fetch-wheels.sh` puts them in .whl/)
# and bring .whl along; this script installs them into /tmp/site when megatron-core is missing.
# REHEARSAL=1 runs the same steps on this CPU machine instead (the tiny config, gloo, fp32, sequence 32,
# a few iterations), to find a broken step before device time is spent on it; its figures mean nothing.
# FP8 GEMMs against bf16 (issue 27), run only when named: fp8_1_6b fp8_12b fp8_report (at the end of this file).
set -uo pipefail
cd "$(dirname "$0")/.."
RES=${RES:-benchmarks/out}
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
REHEARSAL=${REHEARSAL:-0}
if [ "$REHEARSAL" = 1 ]; then
    CFG=configs/tiny/stablelm-2-1_6b.yml SEQ=32 STEPS=2 DEVICE=cpu
    echo "REHEARSAL: the steps on CPU with $CFG (plumbing only: the figures mean nothing)"
else
    CFG=configs/stablelm-2-1_6b.yml SEQ=4096 DEVICE=cuda
    $PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 1
fi
COMMON=(--seq-length "$SEQ" --micro-batch "$MB" --steps "$STEPS" --warmup 3)
bench() {  # bench NAME LIMIT_S [ARGS...]: one benchmark.py run, report in $RES/NAME.{txt,json}
    local name=$1 limit=$2
    shift 2
    echo "=== $name"
    timeout "$(lim "$limit")" $PY tools/benchmark.py "$CFG" "${COMMON[@]}" --json "$RES/$name.json" "$@" 2>&1 \
        | tee "$RES/$name.txt" | grep -E "^(attention|kernels|framework|transformers|speedup|matmul|Traceback|\w*Error)"
    pack
}
want() {
    [ -z "$STEPS_WANTED" ] || [[ " $STEPS_WANTED " == *" $1 "* ]] || return 1
    [ -z "${DEADLINE_S:-}" ] || [ $((DEADLINE_S - SECONDS)) -ge 30 ] || { echo "=== $1: skipped, deadline"; return 1; }
}
lim() {  # lim N: N seconds, or less when DEADLINE_S leaves less
    local left=$(( ${DEADLINE_S:-1000000} - SECONDS - 5 ))
    echo $(( $1 < left ? $1 : (left > 1 ? left : 1) ))
}
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
    timeout "$(lim 150)" $PY tools/benchmark.py "$CFG" "${COMMON[@]}" --recompute none --steps 2 --warmup 1 \
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
    # shellcheck disable=SC2086
    timeout "$(lim 420)" $PY -m pytest -q -p no:cacheprovider \
        ${TEST_FILES:-tests/test_kernels_triton.py tests/test_attention.py tests/test_gpu_trainer.py} -k "${TESTS_K:-}" \
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
    timeout "$(lim 240)" $PY benchmarks/kernels_bench.py 2>&1 | tee "$RES/kernels.txt"
fi

# ---------------------------------------------------------------- the trainer path (issue 18)
# 8. the step as the trainer runs it (TrainingEngine: DeepSpeed ZeRO-1, bf16 compute with fp32 master
#    weights and Adam state, clipping, non-finite guard) against transformers in mixed precision (bf16
#    weights, fp32 master copy + torch AdamW, same clipping); TRAINER_MICRO_BATCH=2 if HF runs out of memory
# 8b. profile of the trainer step (phases: engine.forward/backward/optimizer/finish_step) and of
#     transformers' mixed-precision step: where the time of each goes
if want trainer_profile; then
    echo "=== trainer_profile"
    timeout "$(lim 200)" $PY tools/benchmark.py "$CFG" "${COMMON[@]}" --mode trainer --recompute none --steps 2 \
        --warmup 1 --micro-batch "${TRAINER_MICRO_BATCH:-$MB}" --vs-hf --profile "$RES/trainer_profile" \
        > "$RES/trainer_profile.txt" 2>&1
    cat "$RES/trainer_profile/phases.txt"
    grep -E "Self CUDA time total" "$RES/trainer_profile/top_ops.txt" "$RES/trainer_profile/hf/top_ops.txt"
    pack
fi
want trainer_bench && bench trainer_bench 300 --mode trainer --recompute none --micro-batch "${TRAINER_MICRO_BATCH:-$MB}" --vs-hf
# 8c. issue 18 part 4: the whole trainer step with LayerNorm (all its variants) on F.layer_norm and
#     every other kernel unchanged: compare its tokens/s with trainer_bench's framework line; the faster
#     path is the one to keep (the microbenchmark and the trace disagreed, see RESULTS.md)
want layernorm && MEGATRON_STABLELM_KERNELS=reference:layernorm bench trainer_eager_layernorm 200 \
    --mode trainer --recompute none --micro-batch "${TRAINER_MICRO_BATCH:-$MB}"
# 8c'. the trainer step with the fused LM head + loss (use_flash_cross_entropy, as Stability's published
#     Stable LM 2 YAMLs set it): against trainer_bench's framework line
want trainer_flashce && bench trainer_flashce 200 --mode trainer --recompute none --micro-batch "${TRAINER_MICRO_BATCH:-$MB}" \
    --override use_flash_cross_entropy=true
# 8d. issue 18 part 4: SDPA restricted to its own flash backend in trainer mode (the default picks cuDNN)
want sdpa_flash && bench trainer_sdpa_flash 200 --mode trainer --recompute none \
    --micro-batch "${TRAINER_MICRO_BATCH:-$MB}" --sdpa-backend flash
# 8e. packed web-like documents in trainer mode (--documents web: log-normal lengths, mean ~700 tokens,
#     positions and cu_seqlens by the loader's rule, as with reset_attention_mask): the default kernel
#     (torch varlen_attn) against the FlexAttention block mask, and a profile of the default: where the
#     attention work the documents save goes (train_varlen gained 1% tokens/s for 68% less of it)
TRAINER_ARGS=(--mode trainer --recompute none --micro-batch "${TRAINER_MICRO_BATCH:-$MB}")
want trainer_docs && bench trainer_docs 200 "${TRAINER_ARGS[@]}" --documents web
if want trainer_docs_flex; then
    if [ "$REHEARSAL" = 1 ]; then
        echo "=== trainer_docs_flex: skipped in the rehearsal (FlexAttention has no backward on CPU)"
    else
        bench trainer_docs_flex 300 "${TRAINER_ARGS[@]}" --documents web --attention flex
    fi
fi
if want trainer_docs_profile; then
    echo "=== trainer_docs_profile"
    timeout "$(lim 200)" $PY tools/benchmark.py "$CFG" "${COMMON[@]}" "${TRAINER_ARGS[@]}" --documents web --steps 2 \
        --warmup 1 --profile "$RES/trainer_docs_profile" > "$RES/trainer_docs_profile.txt" 2>&1
    cat "$RES/trainer_docs_profile/phases.txt"
    grep -E "Self CUDA time total" "$RES/trainer_docs_profile/top_ops.txt"
    pack
fi
# 9.-12. train.py through the real deepspeed launcher (NCCL, bf16, ZeRO-1 as the config says) on
# synthetic tokens. Run directories (checkpoints: ~20 GB each with the fp32 optimizer state) stay in
# $RUNS, outside the archive; their metrics files, the logs and the summaries go into $RES.
RUNS=${RUNS:-/tmp/gpu_runs}
# the name of a run's metrics file, from its one owner (the figures are read from it, not from the log)
METRICS=$($PY -c "from megatron_stablelm.training.run_record import METRICS_FILE; print(METRICS_FILE)")
TRAIN_ITERS=${TRAIN_ITERS:-30}
STOP_AT=${STOP_AT:-15}
TRAIN_OVR=(log_interval=1 steps_per_print=0 eval_interval=0
    vocab_file=null checkpoint_factor=1000000 keep_last_n_checkpoints=1)
if [ "$REHEARSAL" = 1 ]; then
    # enough iterations that the summaries (medians after iteration 5) have rows and the SIGTERM
    # lands mid-run (a tiny iteration takes milliseconds; the script polls the log every 0.5 s)
    TRAIN_ITERS=${REHEARSAL_ITERS:-200} STOP_AT=20 LARGE_ITERS=10
    # padded_vocab_size: room for train_varlen's 258-token tokenizer (the tiny config pads to 256)
    TRAIN_OVR+=(distributed_backend=gloo "bf16={enabled: false}" "optimizer={type: Adam, params: {lr: 0.0006}}"
        padded_vocab_size=512)
fi
if command -v deepspeed > /dev/null; then DS=(deepspeed); else DS=("$PY" -m deepspeed.launcher.runner); fi
DATA=(--synthetic-data) # the train_varlen step reads real shards instead
train_cmd() {  # train_cmd RUN_DIR [KEY=VALUE ...]: CMD = the deepspeed command line of one training run
    CMD=("${DS[@]}" --num_gpus 1 train.py "$CFG" "${DATA[@]}" --override train_iters="$TRAIN_ITERS"
        lr_decay_iters="$TRAIN_ITERS" "${TRAIN_OVR[@]}" save="$1" "${@:2}")
}
run_until_last_iter() {  # run_until_last_iter LIMIT_S LOG: CMD in its own session; once the last
    # iteration is logged the measurement is complete: stop it there (the end-of-training save of a 1.6B
    # model with fp32 optimizer state writes ~20 GB, minutes of device time that measure nothing).
    local limit=$1 log=$2 pid t0=$SECONDS
    setsid "${CMD[@]}" > "$log" 2>&1 &
    pid=$!
    while kill -0 "$pid" 2> /dev/null; do
        if grep -q "iter $TRAIN_ITERS/" "$log" 2> /dev/null; then
            sleep 3 # the metrics line follows the log line
            kill -KILL -- "-$pid" 2> /dev/null
            wait "$pid"
            echo "stopped after iteration $TRAIN_ITERS (measurement complete; final save skipped)" >> "$log"
            return 0
        fi
        if [ $((SECONDS - t0)) -ge "$limit" ]; then
            kill -KILL -- "-$pid" 2> /dev/null
            wait "$pid"
            return 124
        fi
        sleep 1
    done
    wait "$pid"
}
train_run() {  # train_run NAME LIMIT_S [KEY=VALUE ...]: one run in $RUNS/NAME, its output in $RES/NAME.log
    local name=$1 limit code
    limit=$(lim "$2")
    shift 2
    rm -rf "${RUNS:?}/$name" && mkdir -p "$RUNS"
    train_cmd "$RUNS/$name" "$@"
    if [ "${FINAL_SAVE:-0}" = 1 ]; then
        timeout "$limit" "${CMD[@]}" > "$RES/$name.log" 2>&1
    else
        run_until_last_iter "$limit" "$RES/$name.log"
    fi
    code=$?
    echo "exit status $code" >> "$RES/$name.log"
    cp "$RUNS/$name/$METRICS" "$RES/$name.$METRICS" 2> /dev/null
    return $code
}
summarize() {  # summarize NAME MICRO_BATCH: the trainer's own figures (its metrics file) into $RES/NAME.json
    if [ -f "$RUNS/$1/$METRICS" ]; then
        $PY benchmarks/gpu_checks.py train-summary "$RUNS/$1" "$RES/$1.json" --micro-batch "$2"
    else
        echo "$1: no $METRICS (the run failed); the end of $RES/$1.log:" && tail -n 5 "$RES/$1.log"
    fi
    rm -rf "${RUNS:?}/$1"/iter_* # keep the disk for the next checkpoint
    pack
}
if want train; then  # the config as published: full recompute, micro-batch 2 x accumulation 2
    echo "=== train (full recompute), $TRAIN_ITERS iterations"
    train_run train_recompute 540
    summarize train_recompute 2
fi
if want train_recompute_large; then # the published full recompute at larger micro-batches (its memory
    # allows them): does the hardware rate rise enough for the 40% target? accumulation stays the config's 2
    for mb in ${RECOMPUTE_MICRO_BATCHES:-8 4}; do
        echo "=== train (full recompute), micro-batch $mb, ${LARGE_ITERS:-20} iterations"
        TRAIN_ITERS=${LARGE_ITERS:-20} train_run "train_recompute_mb$mb" 300 train_micro_batch_size_per_gpu="$mb"
        summarize "train_recompute_mb$mb" "$mb"
    done
fi
if want train_norecompute; then  # checkpoint_activations false at the largest micro-batch that fits
    # (NORECOMPUTE_ACCUMULATION=N: N micro-batches per optimizer step instead of the config's 2; the
    # fp32-master optimizer step, ~27 ms on an H200, is then paid once per N)
    t0=$SECONDS
    for mb in ${NORECOMPUTE_MICRO_BATCHES:-8 4 2}; do
        left=$(lim $((550 - SECONDS + t0))) # all tries within one device command
        [ "$left" -ge 120 ] || break
        echo "=== train (no recompute), micro-batch $mb"
        train_run train_no_recompute "$((left < 300 ? left : 300))" checkpoint_activations=false \
            train_micro_batch_size_per_gpu="$mb" ${NORECOMPUTE_ACCUMULATION:+gradient_accumulation_steps=$NORECOMPUTE_ACCUMULATION} && break
        grep -qE "out of memory|OutOfMemoryError" "$RES/train_no_recompute.log" || break # only OOM tries smaller
        cp "$RES/train_no_recompute.log" "$RES/train_no_recompute_mb$mb.oom.log" # the next try overwrites it
    done
    summarize train_no_recompute "$mb"
fi
if want train_varlen; then # issue 18 part 4: packed documents through the real data loader
    # (reset_attention_mask, as the published configs set it: varlen attention over cu_seqlens), no
    # recompute, micro-batch 4 x accumulation 2: tokens/s against train_no_recompute's one-document rows
    echo "=== train (no recompute, packed documents from the data loader)"
    VARLEN=$RUNS/varlen_data
    rm -rf "$VARLEN"
    $PY benchmarks/gpu_checks.py varlen-data "$VARLEN" "$RES/varlen_data.json" --tokens 4000000
    DATA=()
    train_run train_varlen 400 checkpoint_activations=false train_micro_batch_size_per_gpu=4 \
        tokenizer_type=HFTokenizer vocab_file="$VARLEN/tokenizer.json" train_data_paths="[$VARLEN/docs]" \
        train_data_weights="[1.0]" reset_attention_mask=true eod_mask_loss=true data_cache_dir="$VARLEN/cache"
    DATA=(--synthetic-data)
    summarize train_varlen 4
fi
descendants() { local c; for c in $(pgrep -P "$1"); do echo "$c" && descendants "$c"; done; }
worker_pid() {  # the train.py rank under a deepspeed launcher (its command line has --local_rank)
    local p
    for p in $(descendants "$1"); do
        tr '\0' ' ' < "/proc/$p/cmdline" 2> /dev/null | grep -q "train.py --local_rank" && echo "$p"
    done | head -n 1
}
resume_check() {  # SIGTERM at iteration STOP_AT, checkpoint, exit 0, resume, losses vs train_recompute's
    local run=$RUNS/resume launcher worker code resumed ckpt
    rm -rf "${RUNS:?}/resume" && mkdir -p "$RUNS"
    train_cmd "$run"
    "${CMD[@]}" > "$RES/resume_first.log" 2>&1 &
    launcher=$!
    timeout "$(lim 240)" bash -c "until grep -q 'iter $STOP_AT/' '$RES/resume_first.log'; do kill -0 $launcher || exit 1; sleep 0.5; done"
    # SIGTERM to the trainer itself, as a scheduler's preemption does: signalled, the deepspeed launcher
    # gives its ranks only 30 s (then SIGKILL) and exits 1 whatever they did
    worker=$(worker_pid "$launcher")
    echo "SIGTERM to train.py rank (pid ${worker:-none}) after iter $STOP_AT" | tee -a "$RES/resume_first.log"
    [ -n "$worker" ] && kill -TERM "$worker"
    timeout "$(lim 150)" tail --pid="$launcher" -f /dev/null
    wait "$launcher"
    code=$?
    ckpt=$(cat "$run/latest" 2> /dev/null)
    train_cmd "$run" load="$run"
    run_until_last_iter "$(lim 200)" "$RES/resume_second.log" # its checkpoint stays the SIGTERM one
    resumed=$?
    cp "$run/$METRICS" "$RES/resume.$METRICS" 2> /dev/null
    $PY benchmarks/gpu_checks.py compare-losses "$RES/train_recompute.$METRICS" "$run" "${ckpt#iter_}" \
        "$RES/sigterm_resume.json" --sigterm-exit "$code" --checkpoint "${ckpt:-none}" --resume-exit "$resumed"
}
if want resume; then
    echo "=== resume: SIGTERM after iteration $STOP_AT, resume, losses against the uninterrupted 'train' run"
    resume_check
    pack
fi
if want rerun; then  # the run-to-run spread of two uninterrupted runs: the yardstick of the resume tolerance
    echo "=== rerun (uninterrupted, same as 'train')"
    train_run train_rerun 540
    rm -rf "${RUNS:?}/train_rerun"
    $PY benchmarks/gpu_checks.py compare-losses "$RES/train_recompute.$METRICS" "$RES/train_rerun.$METRICS" 0 \
        "$RES/rerun.json"
    pack
fi
if want export; then  # convert_to_hf --dtype bf16, transformers on the GPU, logits vs the framework's
    echo "=== export to HF (bf16), logits against the framework's"
    src=$RUNS/resume
    [ -f "$src/latest" ] || { TRAIN_ITERS=5 FINAL_SAVE=1 train_run export_src 200; src=$RUNS/export_src; }
    rm -rf "${RUNS:?}/hf"
    timeout "$(lim 200)" $PY tools/convert_to_hf.py "$src" "$RUNS/hf" --dtype bf16 > "$RES/export.log" 2>&1
    timeout "$(lim 180)" $PY benchmarks/gpu_checks.py logits "$src" "$RUNS/hf" "$RES/hf_logits.json" \
        --device "$DEVICE" --seq "$((SEQ < 1024 ? SEQ : 1024))" >> "$RES/export.log" 2>&1
    tail -n 3 "$RES/export.log"
    pack
fi
if want verdict; then
    $PY benchmarks/gpu_checks.py verdict "$RES" | tee "$RES/verdict.txt"
    pack
fi
# ---------------------------------------------------------------- FP8 GEMMs (issue 27 part 2)
# Run only when named: bash benchmarks/run_gpu.sh fp8_1_6b fp8_12b fp8_report. train.py (the deepspeed launcher,
# bf16, ZeRO-1, synthetic tokens, $FP8_ITERS iterations from the same seed and batches) in bf16 against
# fp8=tensorwise and fp8=rowwise (torchao's recipes, megatron_stablelm/kernels/fp8.py):
#   fp8_1_6b  Stable LM 2 1.6B at seq 4096, no recompute, micro-batch FP8_MICRO_BATCH (4) x accumulation 2;
#   fp8_12b   Stable LM 2 12B's layer shape (hidden 5120, 32 query / 8 KV heads, QK-norm, MLP 13824, vocabulary
#             100352) at TP 1, full recompute as its config, micro-batch 1 x accumulation 2, with as many layers as
#             fit: FP8_12B_LAYERS ("12 10 8") tried in bf16 until one neither runs out of memory nor is
#             refused by train.py's estimate; the FP8 runs take the same count (in fp8_12b_layers.txt);
#   fp8_report  benchmarks/fp8_report.py: tokens/s, MFU on the bf16 peak, peak memory, the loss of every
#             iteration and its largest difference from bf16 -> fp8_report.{txt,json}.
# torchao travels as a wheel in .whl/ (../shared/gpu/fetch-wheels.sh fetches torchao==0.18.0 with the others).
FP8_ITERS=${FP8_ITERS:-$TRAIN_ITERS}
[ "$REHEARSAL" = 1 ] && FP8_ITERS=${REHEARSAL_FP8_ITERS:-12}
want_named() {  # like want, but only when the step is named on the command line
    [[ " $STEPS_WANTED " == *" $1 "* ]] && want "$1"
}
fp8_prepare() {  # torchao importable (from .whl/ when the image lacks it), or say why not
    $PY -c "import torchao" 2> /dev/null && return 0
    local wheel
    wheel=$(ls .whl/torchao-*.whl 2> /dev/null | head -n 1)
    if [ -n "$wheel" ]; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheel"
        export PYTHONPATH=/tmp/site:$PYTHONPATH
    fi
    $PY -c "import torchao" 2> /dev/null || { echo "=== fp8: torchao missing (no .whl/torchao-*.whl): skipped"; return 1; }
}
fp8_run() {  # fp8_run MODEL PRECISION MICRO_BATCH [KEY=VALUE ...]: one comparison run, fp8_MODEL_PRECISION
    local name=fp8_$1_$2 precision=$2 mb=$3
    shift 3
    echo "=== $name"
    [ "$precision" = bf16 ] || set -- "$@" fp8="$precision"
    TRAIN_ITERS=$FP8_ITERS train_run "$name" 400 train_micro_batch_size_per_gpu="$mb" "$@"
}
if want_named fp8_1_6b && fp8_prepare; then
    for precision in bf16 tensorwise rowwise; do
        fp8_run 1_6b "$precision" "${FP8_MICRO_BATCH:-4}" checkpoint_activations=false
        summarize "fp8_1_6b_$precision" "${FP8_MICRO_BATCH:-4}"
    done
fi
if want_named fp8_12b && fp8_prepare; then
    if [ "$REHEARSAL" = 1 ]; then
        CFG12=configs/tiny/stablelm-2-12b.yml LAYERS_12B=${FP8_12B_LAYERS:-3 2}
    else
        CFG12=configs/stablelm-2-12b.yml LAYERS_12B=${FP8_12B_LAYERS:-12 10 8}
    fi
    OVR_12B=(model_parallel_size=1 partition_activations=false gradient_accumulation_steps=2)
    for layers in $LAYERS_12B; do
        CFG=$CFG12 fp8_run 12b bf16 1 "${OVR_12B[@]}" num_layers="$layers" "attention_config=[[[flash], $layers]]" && break
        grep -qE "out of memory|OutOfMemoryError|would run out of memory" "$RES/fp8_12b_bf16.log" || break
        cp "$RES/fp8_12b_bf16.log" "$RES/fp8_12b_bf16_${layers}layers.oom.log" # the next try overwrites it
    done
    echo "$layers" > "$RES/fp8_12b_layers.txt"
    summarize fp8_12b_bf16 1
    for precision in tensorwise rowwise; do
        CFG=$CFG12 fp8_run 12b "$precision" 1 "${OVR_12B[@]}" num_layers="$layers" "attention_config=[[[flash], $layers]]"
        summarize "fp8_12b_$precision" 1
    done
fi
if want_named fp8_report; then
    $PY benchmarks/fp8_report.py "$RES" | tee "$RES/fp8_report.txt"
    pack
fi
echo "results in $RES; copy the figures into benchmarks/RESULTS.md and the files into benchmarks/results/gpu-DATE-DEVICE/"
