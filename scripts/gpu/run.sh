#!/usr/bin/env bash
# The one script a short session on the lent GPU machine runs (one H100, CUDA 13.0 libraries in
# /usr/local/cuda/lib64, torch there, no Rust, no network; see ../shared/cuda/README.md). It
# builds nothing: scripts/gpu/build.sh made carry/ here. From the repository root:
#
#   OUT=/some/folder bash scripts/gpu/run.sh
#
# In order, each step under `timeout` (cut to what is left of BUDGET_S, default 480 s) so one
# failure or hang does not eat the session, each step's output in $OUT/logs/STEP.log:
#   1. the runtime's CUDA tests (carry/tests/*.xz): kernels against the CPU, side by side, and
#      vitdet-b's backbone at 1024 on both devices (its errors printed: `cpu-vs-gpu` lines);
#   2. `vitdet bench --ops` in f32 and bf16 ($OUT/ops_f32.json, ops_bf16.json), convolutions on
#      cuDNN (PyTorch's library) and, in bf16, once more on the im2col kernel;
#   3. the same ops in PyTorch (scripts/gpu/torch_ops.py: $OUT/torch_ops.json);
#   4. end-to-end vitdet-b at 1024: inference in bf16, a training step in bf16, then in f32
#      ($OUT/e2e_*.json), each with a profiled run (device and dispatch time per op kind);
#   5. Table 3 on the GPU: `vitdet study --model vitdet-l --sweep attention,checkpoint --measure`
#      in f16, with eager then fused attention ($OUT/study_vitdet_l_{eager,fused}.txt).
# Last, a short summary table ($OUT/summary.txt too).
set -uo pipefail
: "${OUT:?set OUT to the folder for the results}"
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
for t in carry/tests/*.xz; do
    [ -e "$t" ] || continue
    name=$(basename "$t" .xz)
    xz -dc "$t" >"$BIN/$name" && chmod +x "$BIN/$name"
    step "test_$name" 150 bash -c 'cd runtime && exec "$0" --test-threads=1 --nocapture' "$BIN/$name" &
done
wait

# 2. The op table.
for dtype in f32 bf16; do
    step "ops_$dtype" 120 "$V" bench --device cuda --ops --dtype "$dtype" --iters 10 --warmup 2 \
        --format json --out "$OUT/ops_$dtype.json"
done

# The convolutions again on the runtime's own im2col kernel + cuBLAS, beside cuDNN's.
[ -n "${VITDET_CUDNN:-}" ] && step ops_bf16_im2col 60 "$V" bench --device cuda --ops --only conv --dtype bf16 \
    --conv-engine im2col --iters 10 --warmup 2 --format json --out "$OUT/ops_bf16_im2col.json"

# 3. PyTorch on the same shapes.
"$V" bench --ops --list --format json >"$OUT/ops_list.json"
step torch_ops 150 python3 scripts/gpu/torch_ops.py --list "$OUT/ops_list.json" --dtypes f32,bf16 \
    --iters 10 --warmup 2 --out "$OUT/torch_ops.json"

# 4. End-to-end steps.
e2e() { # e2e MODE DTYPE ITERS LIMIT_S
    step "e2e_$1_$2" "$4" "$V" bench --device cuda --model vitdet-b --image-size 1024 --mode "$1" \
        --dtype "$2" --iters "$3" --warmup 1 --profile --format json --out "$OUT/e2e_$1_$2.json"
}
e2e infer bf16 5 120
e2e train bf16 3 150
e2e train f32 3 120

# 5. Table 3 on the GPU: vitdet-l, attention x block checkpointing, measured. First as detectron2
#    runs it (f16 AMP, eager attention; its H100 numbers are printed beside), then with the fused
#    attention kernels.
if "$V" study --help 2>/dev/null | grep -q -- '--device'; then
    for variant in eager fused; do
        fuse=""
        [ "$variant" = fused ] && fuse=--fuse
        step "study_vitdet_l_$variant" 150 bash -c '"$0" study --model vitdet-l --measure --device cuda \
            --sweep attention,checkpoint --dtype f16 $2 --profile h100-80gb --steps 2 \
            --plot "$1/study_vitdet_l_$3.svg" >"$1/study_vitdet_l_$3.txt"' "$V" "$OUT" "$fuse" "$variant"
    done
else
    printf 'study_vitdet_l\tskipped\t0\n' >>"$STATUS"
    echo "== study_vitdet_l: skipped, this binary's study measures on the CPU only"
fi

python3 scripts/gpu/summary.py "$OUT" | tee "$OUT/summary.txt"
