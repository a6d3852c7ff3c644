#!/usr/bin/env bash
# A real two-node SLURM on this one machine, for tests and for trying `tuneyard submit --slurm`.
#
#   slurm/local-cluster.sh up       start slurmctld + `slurmd -N node1` + `slurmd -N node2`
#   slurm/local-cluster.sh status   show the daemons and `sinfo`
#   slurm/local-cluster.sh down     cancel its jobs, stop its daemons (by the PIDs it recorded)
#
# It uses Debian's slurm-wlm (apt-get install slurm-wlm), runs as root with auth/none (no munge),
# and talks on 127.0.0.1 only: both nodes have NodeAddr=127.0.0.1 and their own slurmd port.
# Every file (config, state, spool, logs, pid files) lives under one directory; after `up`,
#   export SLURM_CONF=$TUNEYARD_SLURM_DIR/slurm.conf
# makes plain sbatch / squeue / sinfo / scancel and `tuneyard submit --slurm` use this cluster.
#
# Settings (environment):
#   TUNEYARD_SLURM_DIR   where everything lives            (default /tmp/tuneyard-slurm)
#   TUNEYARD_SLURM_PORT  slurmctld port; slurmd ports +1,+2 (default 17100)
#   TUNEYARD_SLURM_CPUS  CPUs each node offers              (default: this machine's core count)
set -euo pipefail

DIR=${TUNEYARD_SLURM_DIR:-/tmp/tuneyard-slurm}
PORT=${TUNEYARD_SLURM_PORT:-17100}
CPUS=${TUNEYARD_SLURM_CPUS:-$(nproc)}
NODES=(node1 node2)
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

die() { echo "local-cluster: $*" >&2; exit 1; }

alive() { # alive PIDFILE: the recorded process is still running
  [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

write_conf() {
  local host
  host=$(hostname -s)
  mkdir -p "$DIR/state" "$DIR/log" "$DIR/run"
  for node in "${NODES[@]}"; do mkdir -p "$DIR/spool/$node"; done
  # auth/none + cred/none: no munge on a single machine; the daemons answer on 127.0.0.1 only.
  cat >"$CONF" <<EOF
ClusterName=tuneyard-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
# a requeued job waits cred_expire+1 s before it may start again (default 120 s)
AuthInfo=cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# schedule every 2 s (default 60 s), so a requeued job restarts soon after it is eligible
SchedulerParameters=sched_interval=2
ReturnToService=2
JobRequeue=1
# refuse at submission what the partition can never run (e.g. more nodes than it has), as most sites do
EnforcePartLimits=ALL
MailProg=/bin/true
KillWait=5
MinJobAge=600
InactiveLimit=0
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
NodeName=node[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=[$((PORT + 1))-$((PORT + 2))] CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

wait_idle() { # until both nodes report in (idle or allocated), or 30 s
  local deadline=$((SECONDS + 30)) states
  while ((SECONDS < deadline)); do
    states=$(sinfo -h -N -o '%N %t' 2>/dev/null || true)
    if [[ $(grep -cE ' (idle|alloc|mix)$' <<<"$states") -eq ${#NODES[@]} ]]; then
      return 0
    fi
    sleep 0.5
  done
  die "the nodes did not come up within 30 s (sinfo: ${states:-no answer}); see $DIR/log/"
}

up() {
  command -v slurmctld >/dev/null || die "slurmctld not found; install Debian's slurm-wlm (apt-get install slurm-wlm)"
  [[ $(id -u) -eq 0 ]] || die "run as root: slurmd needs it with SlurmUser=root and auth/none"
  if alive "$DIR/run/slurmctld.pid"; then
    echo "already up; export SLURM_CONF=$CONF"
    return 0
  fi
  write_conf
  # -c: start with a clean job state; -i: ignore stale state files of an earlier cluster in this dir
  slurmctld -c -i -f "$CONF"
  for node in "${NODES[@]}"; do
    slurmd -N "$node" -f "$CONF"
  done
  wait_idle
  echo "up: 2 nodes (node1, node2), ${CPUS} CPUs each, partition debug"
  echo "export SLURM_CONF=$CONF"
}

status() {
  local name
  for name in slurmctld "${NODES[@]/#/slurmd-}"; do
    if alive "$DIR/run/$name.pid"; then
      echo "$name: running (pid $(cat "$DIR/run/$name.pid"))"
    else
      echo "$name: stopped"
    fi
  done
  if alive "$DIR/run/slurmctld.pid"; then
    sinfo -N
    squeue
    echo "export SLURM_CONF=$CONF"
  fi
}

stop_pidfile() { # stop_pidfile FILE: TERM the recorded process, KILL it after 10 s
  local file=$1 pid
  [[ -s $file ]] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  fi
  rm -f "$file"
}

down() {
  if alive "$DIR/run/slurmctld.pid"; then
    # cancel this cluster's jobs first, so slurmd ends their steps (and the Ray inside) itself
    if [[ -n $(squeue -h -o %i 2>/dev/null) ]]; then
      scancel --full --quiet $(squeue -h -o %i) || true
      for _ in $(seq 60); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 0.5; done
    fi
  fi
  for node in "${NODES[@]}"; do stop_pidfile "$DIR/run/slurmd-$node.pid"; done
  stop_pidfile "$DIR/run/slurmctld.pid"
  echo "down"
}

case "${1:-}" in
  up) up ;;
  status) status ;;
  down) down ;;
  *) die "usage: $0 up|status|down   (TUNEYARD_SLURM_DIR=$DIR)" ;;
esac
