# cli_test.sh NAME OPDLM [MPIEXEC...] -- sourced first by the CLI tests that launch MPI: sets OPDLM
# (absolute), MPIEXEC (the given launcher, or Open MPI's mpiexec with the flags of infra.md), LIB,
# a work folder /tmp/opdlm_NAME.* it cds into (removed at exit unless KEEP is set), fail(), one
# OpenMP thread per rank, PYTHONPATH for metrics.py, and make_tiny_teacher.
OPDLM=$(readlink -f "$2")
LIB=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
MPIEXEC=("${@:3}")
[[ ${#MPIEXEC[@]} -gt 0 ]] || MPIEXEC=(mpiexec --allow-run-as-root --oversubscribe --bind-to none --mca btl self,vader)
W=$(mktemp -d "/tmp/opdlm_$1.XXXXXX")
trap '[[ -n "${KEEP:-}" ]] || rm -rf "$W"' EXIT
cd "$W"
fail() { echo "FAIL: $*"; exit 1; }
export OMP_NUM_THREADS=1
export PYTHONPATH="$LIB${PYTHONPATH:+:$PYTHONPATH}"
source "$LIB/tiny_teacher.sh"
