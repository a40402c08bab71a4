#!/usr/bin/env bash
# cluster/local_slurm.sh - a REAL one-node SLURM cluster on this machine (dev boxes and CI: fresh Debian, root).
#
#   bash cluster/local_slurm.sh install   # apt-get install slurm-wlm + munge (skipped when already installed)
#   bash cluster/local_slurm.sh start     # munge key + munged + slurm.conf + slurmctld + slurmd; waits for 'idle'
#   bash cluster/local_slurm.sh status    # sinfo + squeue; exit 0 when the controller answers, 1 otherwise
#   bash cluster/local_slurm.sh test [N..] # smoke test (steps 1-5 or the ones given): srun -n 2, sbatch --wait,
#                                          # --signal=USR2@90 delivery (~70 s), scontrol requeue, preemption
#   bash cluster/local_slurm.sh stop      # stops slurmd, slurmctld, munged
#   bash cluster/local_slurm.sh restart   # stop + start
#
# Every subcommand is idempotent: `start` on a running cluster with an unchanged slurm.conf is a no-op success;
# a changed slurm.conf (e.g. a new version of this script) restarts the SLURM daemons.
#
# What `start` configures, and why (tests/test_local_slurm.py and the submitit launchers rely on it):
#   * munge: /etc/munge/munge.key (munge:munge 0400, created with mungekey if absent); munged runs as the
#     'munge' user as the Debian package expects (falls back to root + --force if that user does not exist).
#   * /etc/slurm/slurm.conf, one node named $(hostname -s) at 127.0.0.1 (works when the hostname does not
#     resolve), ClusterName=cmrfm-local, SlurmUser=root (no permission dance on state dirs on throwaway boxes;
#     jobs still run as the submitting user).
#   * The node's REAL resources: CPUs=$(nproc) and RealMemory = `slurmd -C` RealMemory minus 10% (>=256 MB), so
#     the node never drains for "Low RealMemory"; SlurmdParameters=config_overrides keeps a container whose
#     topology `slurmd -C` reports oddly from being marked INVALID.
#   * SelectType=select/cons_tres + CR_CPU_Memory: CPUs (not cores) are the unit, so `srun -n 2` / a submitit job
#     with tasks_per_node=2 fits on a 2-CPU box whatever its threads-per-core; DefMemPerCPU=1024 so jobs that
#     ask no memory do not grab the whole node.
#   * Partition `debug` (Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4 PriorityTier=1): up to 4
#     jobs may share a CPU, so parallel tests/CI jobs do not queue behind each other on a 2-core machine.
#     Partition `urgent` (PriorityTier=100, PreemptMode=OFF): a job there preempts `debug` jobs -> a real
#     preemption path to test against.
#   * Preemption: PreemptType=preempt/partition_prio, PreemptMode=REQUEUE, GraceTime=30 on `debug`,
#     SlurmctldParameters=preempt_send_user_signal: a preempted job first gets its --signal (USR2 for submitit,
#     which checkpoints and requeues itself) and is requeued, not cancelled. JobRequeue=1 makes every batch job
#     requeueable, so `scontrol requeue <id>` (what submitit's SIGUSR2 handler calls) works without --requeue.
#   * No cgroups (containers often lack a usable cgroup tree): ProctrackType=proctrack/linuxproc,
#     TaskPlugin=task/none, JobAcctGatherType=jobacct_gather/none; no slurmdbd (AccountingStorageType=none):
#     `sacct` is unavailable, so submitit logs "Bypassing sacct error" and job.state reads UNKNOWN; results,
#     done(), requeue and checkpointing work from submitit's files. Use `scontrol show job` for states.
#   * Fast turnaround for tests: KillWait=5, MinJobAge=60 (finished jobs stay visible in `scontrol show job`
#     for a minute), sched_interval=5 and bf_interval=5, AuthInfo=cred_expire=10 (a requeued job may start again
#     ~12 s later instead of after the default 120 s), ReturnToService=2 (a node that went DOWN comes back by itself).
#   * State under /var/spool/slurmctld and /var/spool/slurmd, logs under /var/log/slurm/.
#   Signal timing: slurmctld checks time limits every 30 s and sends `--signal=SIG@T` at the first check where
#   less than T+30 s are left (man sbatch: "up to 60 s" early). With --time=2 --signal=USR2@90 that is the job's
#   first check, possibly in its first second, before any handler is installed (SIGUSR2 then kills the task).
#   The smoke test and the submitit test therefore use --time=3 --signal=USR2@90 (submitit: timeout_min=3 and its
#   default signal_delay_s=90): the signal comes 60-90 s into the job, 90-120 s before the limit.
#
# Environment: LOCAL_SLURM_START_TIMEOUT (seconds to wait for the node to be idle, default 60).
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
CLUSTER_NAME=cmrfm-local
LOG_DIR=/var/log/slurm
CTLD_SPOOL=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_KEY=/etc/munge/munge.key
MUNGE_SOCKET_DIR=/run/munge
START_TIMEOUT=${LOCAL_SLURM_START_TIMEOUT:-60}
NODE=$(hostname -s)
export SLURM_CONF=$CONF

log() { echo "[local_slurm] $*" >&2; }
die() { echo "[local_slurm] ERROR: $*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }
# find daemons also in sbin dirs when PATH lacks them (non-login shells)
export PATH=$PATH:/usr/sbin:/sbin:/usr/local/sbin

is_root() { [ "$(id -u)" -eq 0 ]; }

# pid of a running daemon: from its pid file, else by exact process name; empty when not running
daemon_pid() {
    local name=$1 pidfile=${2:-} pid=""
    if [ -n "$pidfile" ] && [ -s "$pidfile" ]; then
        pid=$(cat "$pidfile" 2>/dev/null || true)
        if [ -n "$pid" ] && [ "$(cat /proc/"$pid"/comm 2>/dev/null || true)" = "$name" ]; then
            echo "$pid"; return 0
        fi
    fi
    # by name: not the two-node cluster's daemons of the same name (cluster/local_slurm_two_nodes.sh, started with
    # -f its own slurm.conf)
    for pid in $(pgrep -x "$name" 2>/dev/null || true); do
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "slurm-two-nodes" || { echo "$pid"; return 0; }
    done
}

stop_daemon() {
    local name=$1 pidfile=${2:-} pid i
    for i in $(seq 1 50); do
        pid=$(daemon_pid "$name" "$pidfile")
        [ -z "$pid" ] && { [ -n "$pidfile" ] && rm -f "$pidfile"; return 0; }
        if [ "$i" -eq 1 ]; then log "stopping $name (pid $pid)"; kill "$pid" 2>/dev/null || true
        elif [ "$i" -eq 30 ]; then log "$name (pid $pid) still alive: SIGKILL"; kill -9 "$pid" 2>/dev/null || true
        fi
        sleep 0.2
    done
    die "could not stop $name"
}

print_logs() {
    local f
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" /var/log/munge/munged.log; do
        [ -f "$f" ] || continue
        echo "----- last lines of $f -----" >&2
        tail -n 40 "$f" >&2 || true
    done
}

# --------------------------------------------------------------------------------------------------- install
cmd_install() {
    if have slurmctld && have slurmd && have munged && have sbatch; then
        log "slurm ($(slurmctld -V 2>/dev/null || echo '?')) and munge already installed"
        return 0
    fi
    is_root || die "slurm-wlm/munge are not installed and this is not root: run as root, or install them first \
(apt-get install -y --no-install-recommends slurm-wlm munge)"
    have apt-get || die "apt-get not found: this script supports Debian/Ubuntu only"
    log "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends slurm-wlm munge
    have slurmctld && have slurmd && have munged || die "install finished but slurmctld/slurmd/munged are missing"
    log "installed $(slurmctld -V)"
}

# ----------------------------------------------------------------------------------------------------- munge
munge_ok() { have munge && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    local user=root
    id munge >/dev/null 2>&1 && user=munge
    mkdir -p /etc/munge /var/lib/munge /var/log/munge "$MUNGE_SOCKET_DIR"
    if [ ! -s "$MUNGE_KEY" ]; then
        log "creating munge key $MUNGE_KEY"
        if have mungekey; then mungekey --create --keyfile="$MUNGE_KEY"
        else dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
        fi
    fi
    chown "$user:$user" /etc/munge "$MUNGE_KEY" /var/lib/munge /var/log/munge "$MUNGE_SOCKET_DIR" 2>/dev/null \
        || chown "$user" /etc/munge "$MUNGE_KEY" /var/lib/munge /var/log/munge "$MUNGE_SOCKET_DIR"
    chmod 0700 /etc/munge /var/log/munge
    chmod 0711 /var/lib/munge
    chmod 0755 "$MUNGE_SOCKET_DIR"
    chmod 0400 "$MUNGE_KEY"
    if [ -n "$(daemon_pid munged "$MUNGE_SOCKET_DIR/munged.pid")" ] && munge_ok; then
        return 0
    fi
    stop_daemon munged "$MUNGE_SOCKET_DIR/munged.pid"
    log "starting munged as $user"
    if [ "$user" = munge ]; then
        if have runuser; then runuser -u munge -- /usr/sbin/munged
        else su -s /bin/sh munge -c /usr/sbin/munged
        fi
    else
        munged --force
    fi
    local i
    for i in $(seq 1 50); do munge_ok && return 0; sleep 0.2; done
    print_logs
    die "munged does not answer (munge -n | unmunge fails)"
}

# ------------------------------------------------------------------------------------------------ slurm.conf
# what both local clusters share (cluster/local_slurm_two_nodes.sh sources this file): munge, no cgroups, the
# scheduler, requeue, fast turnaround for tests
common_conf() {
    cat <<EOF
SlurmUser=root
AuthType=auth/munge
CryptoType=crypto/munge
AuthInfo=cred_expire=10
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups: works in containers
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# scheduling
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SlurmdParameters=config_overrides
JobRequeue=1
# fast turnaround for tests
KillWait=5
MinJobAge=60
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
EOF
}

write_conf() {  # writes the config to $1
    local out=$1 cpus realmem mem_mb margin
    cpus=$(nproc)
    realmem=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]\+\).*/\1/p' | head -n1)
    if [ -z "$realmem" ]; then  # fall back to /proc/meminfo
        realmem=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 ))
    fi
    margin=$(( realmem / 10 )); [ "$margin" -lt 256 ] && margin=256
    mem_mb=$(( realmem - margin )); [ "$mem_mb" -lt 256 ] && mem_mb=256
    local defmem=1024; [ $(( defmem * cpus )) -gt "$mem_mb" ] && defmem=$(( mem_mb / cpus ))
    {
        cat <<EOF
# Generated by cluster/local_slurm.sh (one-node test cluster); edits are overwritten by 'start'.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
StateSaveLocation=$CTLD_SPOOL
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
DefMemPerCPU=$defmem
# preemption (requeue, user signal first)
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
EOF
        common_conf
        cat <<EOF
# the node: real CPU count (nproc) and memory (slurmd -C RealMemory=$realmem minus $margin MB)
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4 PriorityTier=1 GraceTime=30
PartitionName=urgent Nodes=$NODE Default=NO MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=100 PreemptMode=OFF
EOF
    } >"$out"
}

# ----------------------------------------------------------------------------------------------------- slurm
ctld_answers() { have scontrol && scontrol ping 2>/dev/null | grep -q "is UP"; }

node_state() { sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1 || true; }

wait_node_idle() {
    local deadline=$(( $(date +%s) + START_TIMEOUT )) st resumed=0
    while [ "$(date +%s)" -lt "$deadline" ]; do
        st=$(node_state)
        case "$st" in
            idle|mixed|allocated|completing) log "node $NODE is $st"; return 0 ;;
            down*|drain*|fail*)
                if [ "$resumed" -lt 3 ]; then
                    log "node $NODE is $st: scontrol update state=resume"
                    scontrol update nodename="$NODE" state=resume 2>/dev/null || true
                    resumed=$((resumed + 1))
                fi ;;
        esac
        sleep 1
    done
    print_logs
    sinfo -N -l >&2 || true
    scontrol show node "$NODE" >&2 || true
    die "node $NODE not idle after ${START_TIMEOUT}s (state: ${st:-none})"
}

cmd_start() {
    have slurmctld && have slurmd && have munged || die "slurm/munge not installed: run '$0 install' first"
    is_root || die "start needs root (daemons, /etc/slurm, /var/spool)"
    start_munge

    mkdir -p "$CONF_DIR" "$LOG_DIR" "$CTLD_SPOOL" "$SLURMD_SPOOL"
    chmod 0755 "$CONF_DIR" "$LOG_DIR" "$CTLD_SPOOL" "$SLURMD_SPOOL"
    local tmp changed=0
    tmp=$(mktemp)
    write_conf "$tmp"
    if ! cmp -s "$tmp" "$CONF"; then
        changed=1
        log "writing $CONF"
        install -m 0644 "$tmp" "$CONF"
    fi
    rm -f "$tmp"
    # Debian's slurm needs no cgroup.conf with proctrack/linuxproc + task/none; remove a stale one of ours.
    if [ -f "$CONF_DIR/cgroup.conf" ] && grep -q "local_slurm.sh" "$CONF_DIR/cgroup.conf"; then
        rm -f "$CONF_DIR/cgroup.conf"
    fi

    local ctld slurmd_pid
    ctld=$(daemon_pid slurmctld "$CTLD_PID"); slurmd_pid=$(daemon_pid slurmd "$SLURMD_PID")
    if [ "$changed" -eq 1 ] && { [ -n "$ctld" ] || [ -n "$slurmd_pid" ]; }; then
        log "slurm.conf changed: restarting the SLURM daemons"
        stop_daemon slurmd "$SLURMD_PID"; stop_daemon slurmctld "$CTLD_PID"
        ctld=""; slurmd_pid=""
    fi
    if [ -n "$ctld" ] && ! ctld_answers; then
        # a hung controller: give it a few seconds, then restart it
        sleep 3
        ctld_answers || { log "slurmctld (pid $ctld) does not answer: restarting it"; stop_daemon slurmctld "$CTLD_PID"; ctld=""; }
    fi
    if [ -z "$ctld" ]; then
        log "starting slurmctld"
        slurmctld || { print_logs; die "slurmctld failed to start"; }
        local i
        for i in $(seq 1 50); do ctld_answers && break; sleep 0.2; done
        ctld_answers || { print_logs; die "slurmctld does not answer 'scontrol ping'"; }
    fi
    if [ -z "$slurmd_pid" ]; then
        log "starting slurmd"
        slurmd || { print_logs; die "slurmd failed to start"; }
    fi
    wait_node_idle
    log "cluster $CLUSTER_NAME is up: partition debug on $NODE ($(nproc) CPUs)"
}

cmd_stop() {
    stop_daemon slurmd "$SLURMD_PID"
    stop_daemon slurmctld "$CTLD_PID"
    stop_daemon munged "$MUNGE_SOCKET_DIR/munged.pid"
    log "stopped"
}

cmd_status() {
    if ! have sinfo; then echo "slurm is not installed"; return 1; fi
    if ! ctld_answers; then echo "slurmctld does not answer (cluster down)"; return 1; fi
    sinfo
    echo
    squeue
    return 0
}

# ------------------------------------------------------------------------------------------------------ test
# Each step writes its scripts and marker files under $TD (a fresh temp dir, removed on exit).
TD=""

test_srun() {
    log "1/5 srun -n 2 hostname"
    local out
    out=$(timeout 120 srun -n 2 -t 1 hostname)
    echo "$out" | sed 's/^/    /'
    [ "$(echo "$out" | grep -c .)" -eq 2 ] || die "srun -n 2 did not print 2 lines"
}

test_sbatch_wait() {
    log "2/5 sbatch --wait (2 tasks)"
    cat >"$TD/wait.sh" <<'EOF'
#!/bin/bash
#SBATCH -n 2
#SBATCH -t 1
srun bash -c 'echo "task $SLURM_PROCID of $SLURM_NTASKS on $(hostname)"'
EOF
    timeout 120 sbatch --wait -o "$TD/wait.out" "$TD/wait.sh" >/dev/null || die "sbatch --wait failed"
    sed 's/^/    /' "$TD/wait.out"
    grep -q "task 0 of 2" "$TD/wait.out" && grep -q "task 1 of 2" "$TD/wait.out" || die "sbatch job output is wrong"
}

test_signal() {
    log "3/5 --time=3 --signal=USR2@90: the job step must get SIGUSR2 before the 180 s limit (expected 60-90 s in)"
    # same shape as a submitit job: the signal goes to the srun step (no 'B:'), the task traps it and exits
    # (SLURM signals every process of the step, so the 'sleep' child dies of it too: harmless)
    cat >"$TD/signal.sh" <<EOF
#!/bin/bash
#SBATCH -n 1
#SBATCH -t 3
#SBATCH --signal=USR2@90
date +%s > $TD/signal.jobstart
srun bash -c 'trap "date +%s > $TD/signal.got; exit 0" USR2; while true; do sleep 1; done'
EOF
    # polled here rather than with 'sbatch --wait', which checks less and less often (up to ~30 s late)
    local t0 t1 jobid i st
    t0=$(date +%s)
    jobid=$(sbatch --parsable -o "$TD/signal.out" "$TD/signal.sh"); jobid=${jobid%%;*}
    for i in $(seq 1 250); do
        [ -s "$TD/signal.got" ] && break
        if [ -z "$(squeue -h -j "$jobid" -o %i 2>/dev/null)" ]; then sleep 1; break; fi  # ended without it
        sleep 1
    done
    t1=$(date +%s)
    if [ ! -s "$TD/signal.got" ]; then
        cat "$TD/signal.out" >&2 || true; scancel "$jobid" 2>/dev/null || true
        die "SIGUSR2 was not delivered (job $jobid, $((t1 - t0)) s after submission)"
    fi
    st=$(( $(cat "$TD/signal.got") - $(cat "$TD/signal.jobstart") ))
    log "    job $jobid: SIGUSR2 arrived $st s after the job started ($((180 - st)) s before its limit)," \
        "$((t1 - t0)) s after submission"
    [ "$st" -lt 180 ] || die "SIGUSR2 came too late ($st s)"
}

test_requeue() {
    log "4/5 scontrol requeue of a running job: it must run again with SLURM_RESTART_COUNT=1"
    cat >"$TD/requeue.sh" <<EOF
#!/bin/bash
#SBATCH -n 1
#SBATCH -t 5
echo "start restart_count=\${SLURM_RESTART_COUNT:-0}" >> $TD/requeue.starts
if [ "\${SLURM_RESTART_COUNT:-0}" -ge 1 ]; then exit 0; fi
sleep 300
EOF
    local t0 t1 jobid i st=""
    jobid=$(sbatch --parsable -o "$TD/requeue.out" "$TD/requeue.sh"); jobid=${jobid%%;*}
    for i in $(seq 1 60); do [ -s "$TD/requeue.starts" ] && break; sleep 1; done
    [ -s "$TD/requeue.starts" ] || { scancel "$jobid" || true; die "job $jobid did not start"; }
    t0=$(date +%s)
    scontrol requeue "$jobid"
    for i in $(seq 1 150); do [ "$(grep -c . "$TD/requeue.starts")" -ge 2 ] && break; sleep 1; done
    t1=$(date +%s)
    sed 's/^/    /' "$TD/requeue.starts"
    if ! grep -q "restart_count=1" "$TD/requeue.starts"; then
        scontrol show job "$jobid" >&2 || true; scancel "$jobid" || true
        die "job $jobid did not run again after requeue"
    fi
    for i in $(seq 1 30); do
        st=$(scontrol show job "$jobid" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')
        [ "$st" = COMPLETED ] && break; sleep 1
    done
    log "    job $jobid restarted $((t1 - t0)) s after 'scontrol requeue'; final state ${st:-?}"
    [ "$st" = COMPLETED ] || die "requeued job $jobid ended in state ${st:-?}"
}

test_preemption() {
    local ncpu t0 jobid hi i
    ncpu=$(sinfo -h -N -n "$NODE" -o %c | head -n1)
    log "5/5 preemption: an 'urgent' job takes all $ncpu CPUs; the running 'debug' job must get its USR2 at once"
    cat >"$TD/low.sh" <<EOF
#!/bin/bash
#SBATCH -n $ncpu
#SBATCH -t 10
#SBATCH --signal=USR2@30
srun bash -c 'trap "date +%s > $TD/low.usr2.\$SLURM_PROCID; exit 0" USR2; touch $TD/low.ready.\$SLURM_PROCID; while true; do sleep 1; done'
EOF
    jobid=$(sbatch --parsable -o "$TD/low.out" "$TD/low.sh"); jobid=${jobid%%;*}
    for i in $(seq 1 60); do [ -e "$TD/low.ready.0" ] && break; sleep 1; done
    [ -e "$TD/low.ready.0" ] || { scancel "$jobid" || true; die "debug job $jobid did not start"; }
    sleep 1
    t0=$(date +%s)
    hi=$(sbatch --parsable -p urgent -n "$ncpu" -t 1 -o "$TD/high.out" --wrap 'echo urgent ran'); hi=${hi%%;*}
    for i in $(seq 1 60); do
        [ -e "$TD/low.usr2.0" ] && grep -q "urgent ran" "$TD/high.out" 2>/dev/null && break; sleep 1
    done
    [ -e "$TD/low.usr2.0" ] || { scancel "$jobid" "$hi" || true; die "preempted job $jobid got no USR2"; }
    grep -q "urgent ran" "$TD/high.out" 2>/dev/null || { scancel "$jobid" "$hi" || true; die "urgent job $hi did not run"; }
    log "    debug job $jobid got USR2 $(( $(cat "$TD/low.usr2.0") - t0 )) s after urgent job $hi was submitted; $hi ran"
}

cmd_test() {  # args: step numbers to run (default: all)
    ctld_answers || die "cluster is not running: '$0 start' first"
    local steps=("$@") n t_all
    [ ${#steps[@]} -eq 0 ] && steps=(1 2 3 4 5)
    TD=$(mktemp -d /tmp/local_slurm_test.XXXXXX)
    chmod 0777 "$TD"
    trap 'rm -rf "$TD"' EXIT
    t_all=$(date +%s)
    for n in "${steps[@]}"; do
        case "$n" in
            1) test_srun ;; 2) test_sbatch_wait ;; 3) test_signal ;; 4) test_requeue ;; 5) test_preemption ;;
            *) die "unknown test step '$n' (1-5)" ;;
        esac
    done
    log "smoke test passed (steps ${steps[*]}, $(( $(date +%s) - t_all )) s)"
}

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }

[ "${BASH_SOURCE[0]}" = "$0" ] || return 0  # sourced (local_slurm_two_nodes.sh): the functions only
case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    restart) cmd_stop; cmd_start ;;
    status) cmd_status ;;
    test) shift; cmd_test "$@" ;;
    -h|--help|help) usage ;;
    *) usage; exit 2 ;;
esac
