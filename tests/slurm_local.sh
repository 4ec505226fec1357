#!/bin/bash
# slurm-local.sh up|down : munged + slurmctld + 2 slurmd (n1,n2) on 127.0.0.1; no cgroups, no slurmdbd.
# Written from the recipe in the team notes (SLURM_LOCAL.md); tests/test_slurm.py brings it up and down
# with SLURMLAB (a world-executable directory), SLURMLAB_PORT (three free ports) and
# SLURMLAB_FIRST_JOB_ID (job ids, hence the jobs' MASTER_PORTs, differ between test sessions).
set -euo pipefail
B=${SLURMLAB:-/tmp/slurmlab}; P=${SLURMLAB_PORT:-16817}   # ctld port P, slurmd n1 P+1, n2 P+2
export SLURM_CONF=$B/etc/slurm.conf
alive() { local s; s=$(ps -o stat= -p "$1" 2>/dev/null) && [[ $s != Z* ]]; }   # zombie == dead
pids() { cat "$B"/run/slurmd-n1.pid "$B"/run/slurmd-n2.pid "$B"/run/slurmctld.pid "$B"/munge/munged.pid 2>/dev/null || true; }
down() {
  if [ -f "$B"/run/slurmctld.pid ] && alive "$(cat "$B"/run/slurmctld.pid)"; then
    scancel --user=root 2>/dev/null || true        # cancel jobs first so no slurmstepd is left behind
    for _ in $(seq 40); do [ -z "$(squeue -h -t R,CG 2>/dev/null)" ] && break; sleep 0.25; done
  fi
  for p in $(pids); do alive "$p" && kill "$p"; done
  for _ in $(seq 40); do live=; for p in $(pids); do alive "$p" && live=1; done; [ -z "$live" ] && break; sleep 0.25; done
  for p in $(pids); do alive "$p" && kill -9 "$p"; done; rm -f "$B"/run/*.pid "$B"/munge/munged.pid
}
up() {
  down
  rm -rf "${B:?}"/{etc,state,spool,log,run,munge}; mkdir -p "$B"/{etc,state,spool/n1,spool/n2,log,run,munge}
  chmod 755 "$B"/munge; mungekey --create --keyfile="$B"/munge/munge.key   # socket dir a+x; key root 0600
  { cat /etc/hosts; echo "127.0.0.1 n1 n2"; } > "$B"/etc/hosts
  cat > "$SLURM_CONF" <<EOF
ClusterName=lab
FirstJobId=${SLURMLAB_FIRST_JOB_ID:-1}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$P
SlurmUser=root
AuthInfo=socket=$B/munge/munge.socket.2,cred_expire=10
StateSaveLocation=$B/state
SlurmdSpoolDir=$B/spool/%n
SlurmctldPidFile=$B/run/slurmctld.pid
SlurmdPidFile=$B/run/slurmd-%n.pid
SlurmctldLogFile=$B/log/slurmctld.log
SlurmdLogFile=$B/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobCompType=jobcomp/filetxt
JobCompLoc=$B/log/jobcomp.txt
MinJobAge=4
KillWait=10
ReturnToService=2
MailProg=/bin/true
SlurmdParameters=config_overrides
NodeName=n[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[$((P+1))-$((P+2))] CPUs=2 CoresPerSocket=2 RealMemory=1000
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
  local D="munged --key-file=$B/munge/munge.key --socket=$B/munge/munge.socket.2 --pid-file=$B/munge/munged.pid"
  D+=" --log-file=$B/munge/munged.log --seed-file=$B/munge/munged.seed && slurmctld -f $SLURM_CONF"
  D+=" && slurmd -f $SLURM_CONF -N n1 && slurmd -f $SLURM_CONF -N n2"
  # Daemons (hence all jobs) run in a private mount ns whose /etc/hosts knows n1,n2; host file untouched.
  local NS="unshare -m --propagation private" MNT="mount --bind $B/etc/hosts /etc/hosts &&"
  $NS true 2>/dev/null || { echo "WARN: no mount ns: n1/n2 won't resolve in jobs" >&2; NS=; MNT=; }
  $NS bash -c "$MNT $D" || { down; echo "start failed, see $B/log" >&2; exit 1; }
  for _ in $(seq 120); do [ "$(sinfo -h -o '%D %T' 2>/dev/null)" = "2 idle" ] && return; sleep 0.25; done
  down; echo "nodes never became idle, see $B/log" >&2; exit 1
}
"${1:?usage: $0 up|down}"
