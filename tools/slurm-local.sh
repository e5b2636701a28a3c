#!/usr/bin/env bash
# slurm-local.sh -- throwaway single-node Slurm cluster for CI/tests, run as root.
# Tested on Debian 12: slurm-wlm 22.05.8 (slurmctld slurmd slurm-client), munge 0.5.15.
#
#   sudo apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
#   eval "$(tools/slurm-local.sh start)"   # prints: export SLURM_CONF=...
#   sinfo; sbatch ...; squeue ...
#   tools/slurm-local.sh stop              # cancels jobs, stops slurmd, slurmctld, munged by PID
#
# Everything (munge key + socket, slurm.conf, state, spool, logs, pid files) lives
# under $SLURM_LOCAL_DIR (default /tmp/slurm-local); /etc/slurm, /etc/munge, /run/munge
# and systemd are not used. Non-default ports so it cannot clash with a real cluster.
set -euo pipefail

D=${SLURM_LOCAL_DIR:-/tmp/slurm-local}
CTLD_PORT=${SLURM_LOCAL_CTLD_PORT:-16817}
SLURMD_PORT=${SLURM_LOCAL_SLURMD_PORT:-16818}
# slurmd finds its NodeName by matching `hostname -s`, falling back to "localhost";
# NodeName=localhost therefore works whatever the (possibly unresolvable) hostname is.
HOST=${SLURM_LOCAL_NODENAME:-localhost}
# nproc obeys OMP_NUM_THREADS (a test harness may export 1): count the CPUs without it
CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))   # leave 1 GiB
CRED_EXPIRE=${SLURM_LOCAL_CRED_EXPIRE:-10}   # also = delay before a requeued job may restart (default 120 s!)
CONF=$D/etc/slurm.conf
SOCK=$D/run/munge.socket.2

log() { echo "[slurm-local] $*" >&2; }

wait_pid_gone() {  # pid timeout_s
  local pid=$1 t=$2 i
  for ((i = 0; i < t * 10; i++)); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  return 1
}

stop_pidfile() {  # name pidfile
  local name=$1 f=$2 pid
  [[ -s $f ]] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_pid_gone "$pid" 15; then
      log "$name ($pid) ignored SIGTERM, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      wait_pid_gone "$pid" 5 || true
    fi
    log "stopped $name (pid $pid)"
  fi
  rm -f "$f"
}

write_conf() {
  cat >"$CONF" <<EOF
# Throwaway single-node Slurm (22.05) for CI: everything as root, state under $D
ClusterName=ci
SlurmctldHost=$HOST
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$SOCK,cred_expire=$CRED_EXPIRE
CredType=cred/munge
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No usable cgroup setup in a VM/container: track processes via /proc, no binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
# Cancel jobs whose dependency can never be met (afterok on a failed job) instead of
# leaving them PENDING (DependencyNeverSatisfied) forever. NB: in 22.05 this is
# DependencyParameters; under SchedulerParameters it is silently ignored.
DependencyParameters=kill_invalid_depend
# reject at submit time what can never run (e.g. sbatch -n 4 on a 2-CPU node
# would otherwise sit PENDING with Reason=PartitionConfig forever)
EnforcePartLimits=ALL
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Debian's Open MPI 4.1 direct-launches under srun only via PMIx (pmi2/none fail in MPI_Init)
MpiDefault=pmix
ReturnToService=2
MailProg=/bin/true
JobRequeue=1
MinJobAge=300
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  if [[ -s $D/run/slurmctld.pid ]] && kill -0 "$(cat "$D/run/slurmctld.pid")" 2>/dev/null; then
    log "already running in $D"; echo "export SLURM_CONF=$CONF"; return 0
  fi
  case $D in /|/tmp|/root|/home|/var|"") log "refusing SLURM_LOCAL_DIR=$D"; exit 1 ;; esac
  rm -rf "$D"
  mkdir -p "$D"/{etc,run,log,state,spool,munge}
  chmod 700 "$D/munge"
  # munge: private key, private socket (munged runs fine as root with these paths)
  dd if=/dev/urandom of="$D/munge/munge.key" bs=1024 count=1 status=none
  chmod 600 "$D/munge/munge.key"
  munged --socket="$SOCK" --key-file="$D/munge/munge.key" --pid-file="$D/run/munged.pid" \
         --log-file="$D/log/munged.log" --seed-file="$D/munge/munged.seed"
  for _ in $(seq 50); do [[ -S $SOCK ]] && break; sleep 0.1; done
  munge -S "$SOCK" -n | unmunge -S "$SOCK" >/dev/null || { log "munge self-test failed"; exit 1; }

  write_conf
  export SLURM_CONF=$CONF
  slurmctld -f "$CONF"            # daemonizes; -D would keep it in the foreground
  slurmd -f "$CONF"               # (-N <NodeName> forces the name if neither matches)
  local i state=""
  for ((i = 0; i < 300; i++)); do
    state=$(sinfo -h -N -o %T 2>/dev/null | head -1 || true)
    [[ $state == idle ]] && break
    sleep 0.2
  done
  if [[ $state != idle ]]; then
    log "node did not become idle (state='$state'); logs:"
    tail -n 20 "$D/log/slurmctld.log" "$D/log/slurmd.log" >&2 || true
    exit 1
  fi
  log "up: $(sinfo -h -o '%P %a %D %T %N')  (conf: $CONF)"
  echo "export SLURM_CONF=$CONF"
}

stop() {
  export SLURM_CONF=$CONF
  if [[ -s $D/run/slurmctld.pid ]] && kill -0 "$(cat "$D/run/slurmctld.pid")" 2>/dev/null; then
    scancel --quiet --user=root 2>/dev/null || true
    for _ in $(seq 100); do [[ -z $(squeue -h -t R,CG 2>/dev/null) ]] && break; sleep 0.2; done
    # stops slurmctld and slurmd together (~2 s); SIGTERM to slurmd first makes
    # slurmctld's own shutdown wait ~4 s on the missing node. The daemons delete
    # their pid files themselves, so read the PIDs first.
    local pids="" f
    for f in "$D/run/slurmctld.pid" "$D/run/slurmd.pid"; do [[ -s $f ]] && pids+=" $(cat "$f")"; done
    scontrol shutdown >/dev/null 2>&1 || true
    for pid in $pids; do wait_pid_gone "$pid" 10 || true; done
  fi
  stop_pidfile slurmctld "$D/run/slurmctld.pid"   # fallbacks: TERM, then KILL, by PID
  stop_pidfile slurmd "$D/run/slurmd.pid"
  stop_pidfile munged "$D/run/munged.pid"
  # a slurmstepd of an unfinished job would outlive slurmd: report, never pkill
  local left
  left=$(pgrep -a slurmstepd || true)
  [[ -n $left ]] && log "slurmstepd still running (inspect/kill by PID): $left"
  return 0
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) SLURM_CONF=$CONF sinfo; SLURM_CONF=$CONF squeue ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
