#!/usr/bin/env bash
# Builds, here, what scripts/gpu/run.sh carries to the lent GPU machine (no Rust there), into
# carry/ (git-ignored):
#   carry/vitdet.xz         the CLI: release, --features cuda, stripped, xz-compressed
#   carry/tests/NAME.xz     the CUDA test binaries (runtime/tests/cuda/, one module per kernel family, and
#                           tests/cuda_end_to_end.rs), likewise
#   carry/kernels.tar.xz    the CUDA kernels' PTX for CUDA_COMPUTE_CAP (`vitdet kernels`)
#   carry/sanitizer.tar.xz  NVIDIA's compute-sanitizer (from PyPI), for run.sh's race and memory checks
# Needs the CUDA 13.0 toolkit that ../shared/cuda/setup-cuda13-from-pypi.sh lays out (nvcc for
# candle's kernels). A clean build takes ~10 minutes on 2 cores; incremental ones are quick.
#
#   bash scripts/gpu/build.sh            # then carry `carry` to the GPU machine
set -euo pipefail
cd "$(dirname "$0")/../.."

export CUDA_HOME=${CUDA_HOME:-$HOME/.cache/cuda13-pypi/cuda13}
export PATH=$CUDA_HOME/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}   # H100 / H200
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target-cuda}
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
    echo "no nvcc in $CUDA_HOME/bin: run ../shared/cuda/setup-cuda13-from-pypi.sh first" >&2
    exit 1
fi
# The carried tree is limited to 64 MiB in all.
LIMIT_BYTES=$((60 << 20))

cargo build --release --offline --features cuda --bin vitdet
# The test executables cargo reports, kept to the CUDA ones (target names cuda, cuda_*).
tests=$({ cargo test --release --offline --features cuda -p vitdet-runtime --tests --no-run --message-format=json
          cargo test --release --offline --features cuda -p vitdet --test cuda_end_to_end --no-run --message-format=json; } |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    name = m.get("target", {}).get("name", "")
    # cuda_nvrtc needs no GPU: it runs here (cargo test --features cuda --test cuda_nvrtc).
    cuda = name == "cuda" or name.startswith("cuda_")
    if m.get("reason") == "compiler-artifact" and m.get("executable") and cuda and name != "cuda_nvrtc":
        print(m["target"]["name"], m["executable"])
')
if [ -z "$tests" ]; then
    echo "cargo reported no CUDA test binaries" >&2
    exit 1
fi

rm -rf carry
mkdir -p carry/tests
pack() { # pack SRC DEST: strip and xz SRC into DEST.xz
    strip -o "$2" "$1"
    xz -T2 -6 -f "$2"
}
pack "$CARGO_TARGET_DIR/release/vitdet" carry/vitdet
while read -r name exe; do
    pack "$exe" "carry/tests/$name"
done <<<"$tests"

# The CUDA kernels, compiled here (NVRTC needs no GPU, only a libcuda.so.1 to link against: the
# toolkit's stub) so the GPU session spends no minutes in NVRTC; run.sh points
# VITDET_KERNEL_CACHE at them, unpacked.
stub=$(mktemp -d)
ln -s "$CUDA_HOME/lib64/stubs/libcuda.so" "$stub/libcuda.so.1"
VITDET_KERNEL_CACHE=$stub/kernels LD_LIBRARY_PATH=$stub:$CUDA_HOME/lib64 \
    "$CARGO_TARGET_DIR/release/vitdet" kernels --compute "$CUDA_COMPUTE_CAP"
tar -C "$stub" -cf - kernels | xz -T2 -6 >carry/kernels.tar.xz
rm -rf "$stub"

# compute-sanitizer (NVIDIA's, from PyPI: the lent machine has none), for run.sh's race and
# memory checks of the runtime's kernels; where the download fails run.sh skips those steps.
SANITIZER_VERSION=13.0.85
sanitizer=${XDG_CACHE_HOME:-$HOME/.cache}/vitdet/compute-sanitizer-$SANITIZER_VERSION
if [ ! -x "$sanitizer/bin/compute-sanitizer" ]; then
    tmp=$(mktemp -d)
    if pip download --quiet --no-deps "nvidia-cuda-sanitizer-api==$SANITIZER_VERSION" -d "$tmp" &&
        unzip -q "$tmp"/*.whl -d "$tmp/wheel"; then
        mkdir -p "$sanitizer" && cp -r "$tmp/wheel/nvidia/cu13/bin" "$tmp/wheel/nvidia/cu13/lib" "$sanitizer/"
    fi
    rm -rf "$tmp"
fi
if [ -x "$sanitizer/bin/compute-sanitizer" ]; then
    tar -C "$sanitizer" -cf - bin lib | xz -T2 -6 >carry/sanitizer.tar.xz
else
    echo "no compute-sanitizer (the download failed): run.sh will skip its sanitizer steps" >&2
fi

ls -l carry carry/tests
total=$(du -sb carry | cut -f1)
echo "carry/: $((total >> 20)) MiB"
if [ "$total" -gt "$LIMIT_BYTES" ]; then
    echo "carry/ is over $((LIMIT_BYTES >> 20)) MiB: too big to carry" >&2
    exit 1
fi
