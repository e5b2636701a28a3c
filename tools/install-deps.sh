#!/usr/bin/env bash
# install-deps.sh -- installs every Debian package opdlm needs (build, tests, parity references).
# Idempotent: packages already present are skipped; safe to run concurrently with other apt users.
# docs/dependencies.md says why each package is here.
set -euo pipefail

PKGS=(
  build-essential cmake pkg-config git              # toolchain (usually preinstalled)
  openmpi-bin libopenmpi-dev                        # MPI ranks: tensor x data parallel
  libhdf5-dev hdf5-tools                            # model files and checkpoints (+ h5dump for users)
  libboost-program-options-dev libboost-log-dev     # configs / CLI, logging
  libopenblas-dev                                   # CPU GEMM
  nlohmann-json3-dev                                # config.json, safetensors headers, tokenizer.json, JSONL
  libpcre2-dev                                      # the tokenizer's pre-split regex
  libgtest-dev libbenchmark-dev                     # tests and benchmarks
  python3-torch python3-numpy                       # independent PyTorch references (golden files)
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  echo "install-deps: all ${#PKGS[@]} packages present"
  exit 0
fi
echo "install-deps: installing ${missing[*]}"
SUDO=""
[[ $(id -u) -ne 0 ]] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get -o DPkg::Lock::Timeout=600 update -q
$SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}"
