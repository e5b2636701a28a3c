# shellcheck shell=bash
# slurm/lib/preflight.sh -- the start-up checks of slurm/opdlm.sbatch, as plain functions so that
# tests/slurm/preflight.sh can run them without Slurm. Sourced; nothing runs on source. Every
# function prints what it checked; a failed check prints "preflight FAILED: ..." naming the file,
# key or variable, and returns 1 (warnings print "preflight WARNING: ..." and return 0).
#
#   opdlm_arg KEY ARGS...           value of --KEY=V / --KEY V in ARGS (last wins), else of KEY
#                                   (section.key) in the INI named by --config FILE; else empty
#   ini_get FILE SECTION KEY        value of KEY in [SECTION] of an INI file; else empty
#   expand_tasks_per_node SPEC      SLURM_TASKS_PER_NODE ("4(x2),3") -> "4 4 3"
#   preflight_world NTASKS TP       NTASKS a positive multiple of TP (opdlm itself also refuses a
#                                   world size other than SLURM_NTASKS: parallel.check_slurm_ntasks)
#   preflight_tp_nodes TP SPEC      warns when a TP group would span nodes: ranks are placed in blocks
#                                   per node and TP varies fastest (docs/parallel.md), so every
#                                   node's task count must be a multiple of TP
#   preflight_teacher PATH          the teacher exists; its sha256 matches OPDLM_TEACHER_SHA256 or
#                                   PATH.sha256 when either is given, else it is printed (recorded)
#   preflight_shared_dir DIR NNODES RUNNER...
#                                   writes a token file into DIR and runs RUNNER (e.g. srun
#                                   --ntasks-per-node=1 ...) with a small sh script that reads it back
#                                   on every node: DIR must be one filesystem seen by all NNODES nodes
#   preflight_binary PATH NNODES RUNNER...
#                                   the opdlm binary is executable on every node

PREFLIGHT_TAG=${PREFLIGHT_TAG:-opdlm preflight}

pf_info() { echo "[$PREFLIGHT_TAG] $*"; }
pf_warn() { echo "[$PREFLIGHT_TAG] preflight WARNING: $*" >&2; }
pf_fail() { echo "[$PREFLIGHT_TAG] preflight FAILED: $*" >&2; return 1; }

ini_get() {  # FILE SECTION KEY
  [[ -f $1 ]] || return 0
  awk -v want_sec="$2" -v want_key="$3" '
    { sub(/\r$/, "") }
    /^[ \t]*[#;]/ || /^[ \t]*$/ { next }
    /^[ \t]*\[/ { s = $0; gsub(/^[ \t]*\[|\][ \t]*$/, "", s); sec = s; next }
    sec == want_sec {
      i = index($0, "="); if (i == 0) next
      k = substr($0, 1, i - 1); v = substr($0, i + 1)
      gsub(/^[ \t]+|[ \t]+$/, "", k); gsub(/^[ \t]+|[ \t]+$/, "", v)
      if (k == want_key) val = v
    }
    END { if (val != "") print val }' "$1"
}

opdlm_arg() {  # KEY ARGS...
  local key=$1 val="" config="" found=0 a
  shift
  while (($#)); do
    a=$1
    case $a in
      --"$key"=*) val=${a#*=}; found=1 ;;
      --"$key") val=${2:-}; found=1; shift ;;
      --config=*) config=${a#*=} ;;
      --config) config=${2:-}; shift ;;
    esac
    shift
  done
  if ((found)); then
    echo "$val"
  elif [[ -n $config && $key == *.* ]]; then
    ini_get "$config" "${key%%.*}" "${key#*.}"
  fi
}

expand_tasks_per_node() {  # "4(x2),3" -> "4 4 3"
  local spec=$1 out=() parts=() part n r i
  IFS=, read -r -a parts <<<"$spec"
  for part in "${parts[@]}"; do
    if [[ $part =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
      n=${BASH_REMATCH[1]} r=${BASH_REMATCH[2]}
      for ((i = 0; i < r; i++)); do out+=("$n"); done
    elif [[ $part =~ ^[0-9]+$ ]]; then
      out+=("$part")
    else
      return 1
    fi
  done
  echo "${out[*]}"
}

preflight_world() {  # NTASKS TP
  local ntasks=$1 tp=$2
  [[ $ntasks =~ ^[1-9][0-9]*$ ]] || { pf_fail "SLURM_NTASKS='$ntasks' is not a positive integer (submit with -n/--ntasks or --ntasks-per-node)"; return 1; }
  [[ $tp =~ ^[1-9][0-9]*$ ]] || { pf_fail "parallel.tp='$tp' is not a positive integer"; return 1; }
  ((ntasks % tp == 0)) || { pf_fail "parallel.tp=$tp does not divide SLURM_NTASKS=$ntasks (DP = world size / tp)"; return 1; }
  pf_info "world: $ntasks ranks = TP $tp x DP $((ntasks / tp)) (opdlm checks world size = SLURM_NTASKS itself)"
}

preflight_tp_nodes() {  # TP SLURM_TASKS_PER_NODE
  local tp=$1 spec=$2 counts c i=0 bad=()
  counts=$(expand_tasks_per_node "$spec") || { pf_warn "cannot parse SLURM_TASKS_PER_NODE='$spec'; TP placement not checked"; return 0; }
  for c in $counts; do
    ((c % tp == 0)) || bad+=("node $i: $c tasks")
    i=$((i + 1))
  done
  if ((${#bad[@]})); then
    pf_warn "parallel.tp=$tp: TP groups would span nodes (${bad[*]}; SLURM_TASKS_PER_NODE=$spec). Ranks are" \
      "placed in blocks per node and TP varies fastest (docs/parallel.md), so TP's per-layer all-reduces" \
      "would cross the network: submit with --ntasks-per-node a multiple of $tp."
  else
    pf_info "TP groups of $tp ranks stay within a node (SLURM_TASKS_PER_NODE=$spec)"
  fi
  return 0
}

preflight_teacher() {  # PATH
  local t=$1 want="" from="" got
  [[ -n $t ]] || { pf_fail "no teacher: pass --model.teacher=FILE (or [model] teacher in the --config file)"; return 1; }
  [[ -f $t ]] || { pf_fail "teacher file model.teacher=$t does not exist (from $(pwd))"; return 1; }
  [[ -r $t ]] || { pf_fail "teacher file model.teacher=$t is not readable"; return 1; }
  if [[ -n ${OPDLM_TEACHER_SHA256:-} ]]; then
    want=$OPDLM_TEACHER_SHA256 from="OPDLM_TEACHER_SHA256"
  elif [[ -f $t.sha256 ]]; then
    read -r want _ <"$t.sha256" || true
    from="$t.sha256"
  fi
  if [[ -n $from && ! $want =~ ^[0-9a-fA-F]{64}$ ]]; then
    pf_fail "$from does not hold a sha256 (64 hex digits): '$want'"
    return 1
  fi
  got=$(sha256sum "$t") || { pf_fail "cannot read teacher $t"; return 1; }
  got=${got%% *}
  if [[ -z $from ]]; then
    pf_info "teacher $t sha256 $got (recorded; set OPDLM_TEACHER_SHA256 or write $t.sha256 to check it at every start)"
  elif [[ ${want,,} != "$got" ]]; then
    pf_fail "teacher $t has sha256 $got but $from says ${want,,}: the file changed or is the wrong one"
    return 1
  else
    pf_info "teacher $t sha256 $got matches $from"
  fi
}

# Runs RUNNER (one task per node) with `sh -c SCRIPT _ ARGS...`; each node prints "host ok" or "host BAD why".
_pf_on_nodes() {  # NNODES SCRIPT ARGS... -- RUNNER...
  local nnodes=$1 script=$2 args=() out rc
  shift 2
  while (($#)) && [[ $1 != -- ]]; do args+=("$1"); shift; done
  shift
  out=$("$@" sh -c "$script" _ "${args[@]}" 2>&1) && rc=0 || rc=$?
  PF_NODES_OUT=$out
  PF_NODES_OK=$(grep -c ' ok$' <<<"$out" || true)
  PF_NODES_BAD=$(grep ' BAD ' <<<"$out" || true)
  [[ $rc == 0 && -z $PF_NODES_BAD && $PF_NODES_OK == "$nnodes" ]]
}

preflight_shared_dir() {  # DIR NNODES RUNNER...
  local dir=$1 nnodes=$2 token value
  shift 2
  mkdir -p "$dir" 2>/dev/null || { pf_fail "cannot create the run directory run.out_dir=$dir on $(hostname)"; return 1; }
  token="$dir/.preflight.$(hostname).$$.$RANDOM"
  value="opdlm-preflight ${SLURM_JOB_ID:-nojob} $(date +%s%N)"
  echo "$value" >"$token" || { pf_fail "cannot write into the run directory run.out_dir=$dir on $(hostname)"; return 1; }
  # shellcheck disable=SC2016
  if _pf_on_nodes "$nnodes" \
    'if [ "$(cat "$1" 2>/dev/null)" = "$2" ]; then echo "$(hostname) ok"; else echo "$(hostname) BAD cannot read $1"; fi' \
    "$token" "$value" -- "$@"; then
    rm -f "$token"
    pf_info "run directory $dir is visible from all $nnodes node(s)"
  else
    rm -f "$token"
    pf_fail "the run directory run.out_dir=$dir is not on a filesystem shared by all $nnodes node(s): a token" \
      "written there on $(hostname) was read back on $PF_NODES_OK node(s)." \
      "Checkpoints and the metrics log must be seen by every rank and every restart; put run.out_dir on" \
      "the shared filesystem (Lustre, GPFS, NFS). Per node: $(tr '\n' ';' <<<"$PF_NODES_OUT")"
    return 1
  fi
}

preflight_binary() {  # PATH NNODES RUNNER...
  local bin=$1 nnodes=$2
  shift 2
  [[ -x $bin ]] || { pf_fail "opdlm binary $bin is not an executable file on $(hostname) (set OPDLM=...)"; return 1; }
  # shellcheck disable=SC2016
  if _pf_on_nodes "$nnodes" \
    'if [ -x "$1" ]; then echo "$(hostname) ok"; else echo "$(hostname) BAD no executable $1"; fi' \
    "$bin" -- "$@"; then
    pf_info "opdlm binary $bin is executable on all $nnodes node(s)"
  else
    pf_fail "the opdlm binary $bin is not executable on every node ($PF_NODES_OK of $nnodes):" \
      "build it on the shared filesystem or set OPDLM=... Per node: $(tr '\n' ';' <<<"$PF_NODES_OUT")"
    return 1
  fi
}
