#!/usr/bin/env bash
# The one script a short session on the lent GPU machine runs (one H100, CUDA 13.0 libraries in
# /usr/local/cuda/lib64, torch there, no Rust, no network; see ../shared/cuda/README.md). It
# builds nothing: scripts/gpu/build.sh made carry/ here. From the repository root:
#
#   OUT=/some/folder bash scripts/gpu/run.sh
#
# Each step under `timeout` (cut to what is left of BUDGET_S, default 480 s) so one failure or
# hang does not eat the session, each step's output in logs/STEP.log, most needed first:
#   1. the runtime's CUDA tests (carry/tests/*.xz): kernels against the CPU, side by side, and
#      vitdet-b's backbone at 1024 on both devices (its errors printed: `cpu-vs-gpu` lines);
#   2. `vitdet bench --ops` in bf16 (ops_bf16.json), convolutions on cuDNN (PyTorch's library)
#      and once more on the im2col kernel, attention once more on the FMA kernels;
#   3. the same ops in PyTorch (scripts/gpu/torch_ops.py: torch_ops.json);
#   4. end-to-end vitdet-b at 1024: inference and a training step in bf16 (e2e_*.json), each
#      with a profiled run (device and dispatch time per op kind);
#   5. Table 3 on the GPU: `vitdet study --model vitdet-l --sweep attention,checkpoint --measure`
#      in f16 with the fused attention, then vitdet-l's, vit-b's and vit-l's steps in bf16, then
#      the study with eager attention (study_vitdet_l_{fused,eager}.txt);
#   6. hardware counters (ncu) of the global attention backward's passes and the top-k kernels;
#   7. a training step in f32, if the budget allows (the f32 op table runs right after the bf16
#      one: it takes seconds, and both calibrate the study's predictions);
#   8. compute-sanitizer's racecheck and memcheck on the attention, permute and detection
#      kernels' tests, if the budget allows.
# Last, a short summary table ($OUT/summary.txt too).
#
# The device tool returns at most 8 files from $OUT, so results are written to a scratch folder
# and packed after every step into $OUT/results.tar.gz (unpack it and run scripts/gpu/summary.py
# on it): what finished is there even if the call is cut off.
set -uo pipefail
: "${OUT:?set OUT to the folder for the results}"
FINAL_OUT=$OUT
OUT=$(mktemp -d)
BUDGET_S=${BUDGET_S:-480}
cd "$(dirname "$0")/../.."
START=$(date +%s)
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# cuDNN, which the runtime loads at run time for convolutions: PyTorch's own (the library its
# process maps), so both sides of every comparison convolve with the same cuDNN.
CUDNN=$(python3 -c 'import torch; torch.backends.cudnn.version()
print(next(l.split()[-1] for l in open("/proc/self/maps") if "/libcudnn.so" in l))' 2>/dev/null)
if [ -n "$CUDNN" ] && [ -e "$CUDNN" ]; then
    export VITDET_CUDNN=$CUDNN LD_LIBRARY_PATH=$(dirname "$CUDNN"):$LD_LIBRARY_PATH
    echo "cuDNN: $CUDNN"
else
    echo "cuDNN: not found beside PyTorch; convolutions run on the im2col kernel"
fi

mkdir -p "$OUT/logs"
STATUS=$OUT/status.tsv
: >"$STATUS"

# pack: the results so far into $FINAL_OUT/results.tar.gz, replaced whole.
pack() {
    local part=$FINAL_OUT/results.tar.gz.part
    tar -C "$OUT" -czf "$part" . && mv "$part" "$FINAL_OUT/results.tar.gz"
}

# step NAME LIMIT_S CMD...: CMD under timeout, at most LIMIT_S and what is left of the budget;
# records NAME, exit status (124: timed out) and seconds in status.tsv.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET_S - ($(date +%s) - START)))
    if ((left < 20)); then
        printf '%s\tskipped\t0\n' "$name" >>"$STATUS"
        echo "== $name: skipped, budget spent"
        return
    fi
    ((limit > left - 10)) && limit=$((left - 10))
    echo "== $name (limit ${limit}s)"
    local t0
    t0=$(date +%s)
    timeout -k 5 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
    local rc=$?
    local took=$(($(date +%s) - t0))
    printf '%s\t%s\t%s\n' "$name" "$rc" "$took" >>"$STATUS"
    echo "   $name: exit $rc after ${took}s"
    tail -n 4 "$OUT/logs/$name.log" | sed 's/^/   | /'
    [ -z "${STEP_IN_BACKGROUND:-}" ] && pack
}

# The carried binaries, decompressed outside the repository.
BIN=$(mktemp -d)
if ! xz -dc carry/vitdet.xz >"$BIN/vitdet"; then
    echo "no carry/vitdet.xz: run scripts/gpu/build.sh here and carry \`carry\`" >&2
    exit 1
fi
chmod +x "$BIN/vitdet"
V=$BIN/vitdet
# The kernels' PTX compiled by build.sh: no NVRTC time here unless a kernel changed since.
if [ -e carry/kernels.tar.xz ] && xz -dc carry/kernels.tar.xz | tar -C "$BIN" -xf -; then
    export VITDET_KERNEL_CACHE=$BIN/kernels
fi

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

# 1. Tests, from the runtime's folder as cargo runs them. They time nothing, so the binaries run
#    side by side (each test in a binary one after another): the phase takes the slowest one's
#    time, not the sum, leaving the budget to the timed steps below, which run alone.
#    The kernel families' binary (`cuda`) runs as one process per family (its modules).
for t in carry/tests/*.xz; do
    [ -e "$t" ] || continue
    name=$(basename "$t" .xz)
    xz -dc "$t" >"$BIN/$name" && chmod +x "$BIN/$name"
    families=""
    [ "$name" = cuda ] && families=$("$BIN/$name" --list 2>/dev/null | sed -n 's/^\([a-z0-9_]*\)::.*: test$/\1/p' | sort -u)
    if [ -n "$families" ]; then
        for family in $families; do
            STEP_IN_BACKGROUND=1 step "test_cuda_$family" 150 \
                bash -c 'cd runtime && exec "$0" --test-threads=1 --nocapture "$1::"' "$BIN/$name" "$family" &
        done
    else
        STEP_IN_BACKGROUND=1 step "test_$name" 150 \
            bash -c 'cd runtime && exec "$0" --test-threads=1 --nocapture' "$BIN/$name" &
    fi
done
wait
# Tensor-core attention that fails its tests on this GPU must not time the rest: the FMA
# kernels (the reference path) take over, and the summary says so.
if awk -F'\t' '$1 == "test_cuda_window_attention" && $2 != "0" { bad = 1 } END { exit !bad }' "$STATUS"; then
    export VITDET_ATTENTION_KERNELS=fma
    echo "the tensor-core attention failed its tests (logs/test_cuda_window_attention.log): timing on the FMA kernels" |
        tee "$OUT/attention_fallback.txt"
fi
pack

# 2. The op table, in bf16 (the acceptance table's precision), then in f32.
ops() { # ops DTYPE LIMIT_S
    step "ops_$1" "$2" "$V" bench --device cuda --ops --dtype "$1" --iters 10 --warmup 2 \
        --format json --out "$OUT/ops_$1.json"
}
ops bf16 120
# (seconds each; both calibrate the predictions below)
ops f32 90

# The convolutions again on the runtime's own im2col kernel + cuBLAS, beside cuDNN's.
[ -n "${VITDET_CUDNN:-}" ] && step ops_bf16_im2col 60 "$V" bench --device cuda --ops --only conv --dtype bf16 \
    --conv-engine im2col --iters 10 --warmup 2 --format json --out "$OUT/ops_bf16_im2col.json"

# The attention ops again on the FMA kernels (VITDET_ATTENTION_KERNELS=fma), the tensor-core
# kernels' reference path, in the same run.
step ops_bf16_fma 60 env VITDET_ATTENTION_KERNELS=fma "$V" bench --device cuda --ops --only attention \
    --dtype bf16 --iters 5 --warmup 1 --format json --out "$OUT/ops_bf16_fma.json"

# 3. PyTorch on the same shapes.
"$V" bench --ops --list --format json >"$OUT/ops_list.json"
step torch_ops 150 python3 scripts/gpu/torch_ops.py --list "$OUT/ops_list.json" --dtypes f32,bf16 \
    --iters 10 --warmup 2 --out "$OUT/torch_ops.json"

# This GPU's device profile, calibrated by the op tables just timed (bf16 rows need a bf16 rate:
# not the V100's), for the predictions beside the end-to-end steps and in the Table 3 study; a
# GPU without a profile gets the H100's, uncalibrated.
gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
case "$gpu_name" in
    *H200*) profile=h200-141gb tables="ops_bf16 ops_f32" ;;
    *H100*) profile=h100-80gb tables="ops_bf16 ops_f32" ;;
    *A100*) profile=a100-80gb tables="ops_bf16 ops_f32" ;;
    *) profile=h100-80gb tables="" ;;
esac
calibration=""
for t in $tables; do
    [ -s "$OUT/$t.json" ] && calibration="${calibration:+$calibration,}$OUT/$t.json"
done
[ -n "$calibration" ] && calibration="--calibration $calibration"
# A table the calibration refuses (no row timed) must not cost the measurements.
if [ -n "$calibration" ] && ! "$V" study --model vit-tiny --profile "$profile" $calibration \
    --format json >/dev/null 2>"$OUT/logs/calibration.log"; then
    echo "== calibration refused (logs/calibration.log): predictions are uncalibrated"
    calibration=""
fi

# 4. End-to-end steps, each with the calibrated prediction of the same graph beside it
#    (predicted_*.json, from `vitdet compile --profile`: no GPU time).
e2e() { # e2e MODEL MODE DTYPE ITERS LIMIT_S
    step "e2e_$1_$2_$3" "$5" "$V" bench --device cuda --model "$1" --image-size 1024 --mode "$2" \
        --dtype "$3" --iters "$4" --warmup 1 --profile --format json --out "$OUT/e2e_$1_$2_$3.json"
    "$V" compile --model "$1" --image-size 1024 --mode "$2" --dtype "$3" --profile "$profile" $calibration \
        --format json >"$OUT/predicted_$1_$2_$3.json" 2>>"$OUT/logs/predicted.log" || true
    # On an H200, the same op times carried to the H100's profile (the acceptance's GPU).
    if [ "$profile" = h200-141gb ] && [ -n "$calibration" ]; then
        "$V" compile --model "$1" --image-size 1024 --mode "$2" --dtype "$3" --profile h100-80gb $calibration \
            --calibrated-on h200-141gb --format json >"$OUT/predicted_h100_$1_$2_$3.json" \
            2>>"$OUT/logs/predicted.log" || true
    fi
}
e2e vitdet-b infer bf16 10 120
e2e vitdet-b train bf16 10 150

# vitdet-l's, vit-b's and vit-l's steps in bf16 (run between the two Table 3 studies below).
other_models() {
    local model mode
    for model in vitdet-l vit-b vit-l; do
        for mode in infer train; do
            e2e "$model" "$mode" bf16 3 60
        done
    done
}

# 5. Table 3 on the GPU: vitdet-l, attention x block checkpointing, measured in f16 AMP as
#    detectron2 runs it (its H100 numbers are printed beside): first with the fused attention
#    kernels, then with eager attention as detectron2 computes it.
#    The predicted column is this GPU's profile, calibrated as above.
if "$V" study --help 2>/dev/null | grep -q -- '--calibration'; then
    study() { # study VARIANT
        local fuse=""
        [ "$1" = fused ] && fuse=--fuse
        step "study_vitdet_l_$1" 150 bash -c '"$0" study --model vitdet-l --measure --device cuda \
            --sweep attention,checkpoint --dtype f16 $2 --profile $4 $5 --steps 2 \
            --plot "$1/study_vitdet_l_$3.svg" >"$1/study_vitdet_l_$3.txt"' \
            "$V" "$OUT" "$fuse" "$1" "$profile" "$calibration"
    }
    study fused
    # The other models' steps (deliverable 4) before the eager rows, which were measured before.
    other_models
    study eager
else
    other_models
    printf 'study_vitdet_l\tskipped\t0\n' >>"$STATUS"
    echo "== study_vitdet_l: skipped, this binary's study measures on the CPU only"
fi

# 6. Hardware counters of the kernels still slower than PyTorch's (where ncu reads them: a
#    Firecracker machine): the global attention backward's key and query passes, and the RPN
#    top-k.
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
if [ -n "$NCU" ]; then
    for k in "attention_global_grad window_attention_bwd_(kv|q)_tc 2" "top_k top_k 1"; do
        set -- $k
        step "ncu_$1" 60 "$NCU" --clock-control none -k "regex:$2" -c "$3" --section SpeedOfLight \
            --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
            --section SchedulerStats --section SourceCounters \
            "$V" bench --device cuda --ops --only "$1" --dtype bf16 --iters 1 --warmup 0 --format json \
            --out "$OUT/ncu_$1.json"
    done
fi

# 7. What the budget leaves: f32, and the other models' steps in bf16.
e2e vitdet-b train f32 3 120

# 8. compute-sanitizer on the runtime's own kernels, where build.sh carried it and the budget
#    allows: racecheck of the attention kernels (shared memory, barriers, cp.async stages) and
#    memcheck of the attention, permute and detection families' tests (exit 3: errors found).
if [ -e carry/sanitizer.tar.xz ] && [ -x "$BIN/cuda" ] && mkdir -p "$BIN/sanitizer" &&
    xz -dc carry/sanitizer.tar.xz | tar -C "$BIN/sanitizer" -xf -; then
    SANITIZER=$BIN/sanitizer/bin/compute-sanitizer
    step sanitize_attention_races 120 bash -c 'cd runtime && exec "$0" --tool racecheck --racecheck-memcpy-async yes \
        --error-exitcode 3 --kernel-name kns=window_attention "$1" --test-threads=1 window_attention::' \
        "$SANITIZER" "$BIN/cuda"
    for family in window_attention permute detection; do
        step "sanitize_memcheck_$family" 90 bash -c 'cd runtime && exec "$0" --tool memcheck --error-exitcode 3 \
            "$1" --test-threads=1 "$2::"' "$SANITIZER" "$BIN/cuda" "$family"
    done
fi

python3 scripts/gpu/summary.py "$OUT" >"$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
cp "$OUT/summary.txt" "$FINAL_OUT/summary.txt"
pack
