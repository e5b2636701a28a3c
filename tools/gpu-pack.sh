#!/usr/bin/env bash
# gpu-pack.sh -- package a CUDA build's GPU test and benchmark binaries with the shared libraries they
# need (OpenBLAS, HDF5, Boost, Open MPI, ...) for a GPU machine that has the CUDA driver, cuBLAS and
# NCCL but not our CPU dependencies; tools/gpu-check.sh --prebuilt DIR runs them.
#   tools/gpu-pack.sh BUILD_DIR DEST       e.g. tools/gpu-pack.sh build-gpu .gpu-carry
# cuBLAS/cuBLASLt and NCCL (hundreds of MB) and glibc/libstdc++ are left to the target machine.
set -euo pipefail
BUILD=${1:?usage: gpu-pack.sh BUILD_DIR DEST}
DEST=${2:?usage: gpu-pack.sh BUILD_DIR DEST}
cd "$(dirname "$0")/.."
rm -rf "$DEST"
mkdir -p "$DEST/lib"
bins=("$BUILD/tests/opdlm_gpu_tests")
for f in bench/gpu/*.cpp; do bins+=("$BUILD/bench/opdlm_$(basename "$f" .cpp)"); done
for b in "${bins[@]}"; do
  [ -x "$b" ] || { echo "gpu-pack.sh: missing $b (build it first)" >&2; exit 1; }
  strip -o "$DEST/$(basename "$b")" "$b"
done
skip='^(linux-vdso|ld-linux|libc\.|libm\.|libpthread|libdl\.|librt\.|libresolv|libnsl|libutil|libanl|libstdc\+\+|libgcc_s|libcuda\.|libcublas|libcublasLt|libnccl)'
for b in "${bins[@]}"; do
  ldd "$b" | awk '/=> \//{print $1, $3}'
done | sort -u | while read -r name path; do
  if ! [[ $name =~ $skip ]]; then cp -L "$path" "$DEST/lib/$name"; fi
done
du -sh "$DEST"
