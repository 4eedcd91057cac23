#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, with accounting, for tests and dry runs.
#
#   slurm/local-cluster.sh start    install (Debian packages, as root) and start, idempotently
#   slurm/local-cluster.sh status   what runs, and the node as SLURM sees it
#   slurm/local-cluster.sh stop     stop the daemons this script started (pid files), nothing else
#
# munge, MariaDB, slurmdbd, slurmctld and slurmd all listen on 127.0.0.1 only. Accounting is not
# optional: submitit reads job states with `sacct`, and without slurmdbd a job's state stays
# UNKNOWN and a cancelled job never counts as done. Seconds once the packages are installed.
# Runs as root (SlurmUser=root); the configuration goes to /etc/slurm (this is a test machine's
# cluster: a slurm.conf that this script did not write is never overwritten).
set -euo pipefail

STATE_DIR=${QUP_SLURM_DIR:-/var/lib/qup-slurm}
CLUSTER=${QUP_SLURM_CLUSTER:-qup}
CONF_DIR=/etc/slurm
MARK="# written by qup_ray slurm/local-cluster.sh"
PACKAGES="slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
DB_SOCKET=/run/mysqld/mysqld.sock

log() { echo "local-cluster: $*" >&2; }

pid_file() {  # MariaDB runs as mysql and writes its pid file where that user may
    if [[ $1 == mariadb ]]; then echo /run/mysqld/qup-mariadb.pid; else echo "$STATE_DIR/run/$1.pid"; fi
}

running() {  # running NAME: the pid file names a live process
    local pid_file
    pid_file=$(pid_file "$1")
    [[ -f $pid_file ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq $((seconds * 4))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.25
    done
    log "gave up waiting for $what (${seconds}s); logs in $STATE_DIR/log"
    return 1
}

install_packages() {
    local missing=""
    for p in $PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
    [[ -z $missing ]] && return 0
    [[ $(id -u) == 0 ]] || { log "missing packages:$missing (run as root)"; exit 1; }
    log "installing$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

write_configs() {
    mkdir -p "$STATE_DIR"/{run,log,ctld,spool} "$CONF_DIR"
    if [[ -f $CONF_DIR/slurm.conf ]] && ! grep -qF "$MARK" "$CONF_DIR/slurm.conf"; then
        log "$CONF_DIR/slurm.conf was not written by this script; leaving it alone"
        exit 1
    fi
    # Node topology as slurmd itself detects it; memory leaves 1 GiB to the system.
    local node mem proctrack
    node=$(slurmd -C | head -n1)
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
    node=$(sed "s/RealMemory=[0-9]*/RealMemory=$((mem > 2048 ? mem - 1024 : mem))/" <<<"$node")
    node=$(sed "s/^NodeName=[^ ]*/NodeName=$(hostname -s) NodeAddr=127.0.0.1/" <<<"$node")
    # cgroup process tracking (kills everything a job started) where cgroup v1's freezer exists.
    proctrack=proctrack/linuxproc
    [[ -d /sys/fs/cgroup/freezer ]] && proctrack=proctrack/cgroup
    cat >"$CONF_DIR/slurm.conf" <<EOF
$MARK
ClusterName=$CLUSTER
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MailProg=/bin/true
ProctrackType=$proctrack
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=1024
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,kill_invalid_depend
MinJobAge=300
KillWait=5
JobRequeue=1
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/run/slurmctld.pid
SlurmdPidFile=$STATE_DIR/run/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
JobAcctGatherType=jobacct_gather/none
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$CONF_DIR/cgroup.conf" <<EOF
$MARK
CgroupPlugin=cgroup/v1
ConstrainCores=no
ConstrainRAMSpace=no
EOF
    cat >"$CONF_DIR/slurmdbd.conf" <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
LogFile=$STATE_DIR/log/slurmdbd.log
PidFile=$STATE_DIR/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=slurm
EOF
    chmod 600 "$CONF_DIR/slurmdbd.conf"
}

start_munge() {
    pgrep -x munged >/dev/null && return 0
    mkdir -p /run/munge && chown munge:munge /run/munge
    [[ -f /etc/munge/munge.key ]] || { mungekey --create 2>/dev/null || create-munge-key -f; }
    su -s /bin/sh munge -c "munged --force" || munged --force
    wait_for 10 munge munge -n
}

start_mariadb() {
    if ! [[ -S $DB_SOCKET ]] || ! mariadb-admin --socket="$DB_SOCKET" ping >/dev/null 2>&1; then
        mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
        nohup mariadbd --user=mysql --bind-address=127.0.0.1 --socket="$DB_SOCKET" \
            --pid-file="$(pid_file mariadb)" >"$STATE_DIR/log/mariadb.log" 2>&1 &
        wait_for 60 MariaDB mariadb-admin --socket="$DB_SOCKET" ping
    fi
    mariadb --socket="$DB_SOCKET" <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
}

start_daemon() {  # start_daemon NAME WAIT_COMMAND...
    local name=$1
    shift
    running "$name" && return 0
    "/usr/sbin/$name" >>"$STATE_DIR/log/$name.out" 2>&1
    wait_for 30 "$name" "$@"
}

start() {
    install_packages
    write_configs
    start_munge
    start_mariadb
    start_daemon slurmdbd sacctmgr -n list cluster
    # slurmctld registers the cluster with slurmdbd; add it first so accounting starts at once.
    sacctmgr -i -n add cluster "$CLUSTER" >/dev/null 2>&1 || true
    start_daemon slurmctld scontrol ping
    start_daemon slurmd bash -c "sinfo -h -N -o %t | grep -qE '^(idle|mix|alloc)'"
    log "up: $(sinfo -h -N -o '%N %t %c CPUs %m MB')"
}

stop() {
    # Only what this script started, by its pid files; jobs of the cluster end with slurmd.
    for name in slurmd slurmctld slurmdbd mariadb; do
        if running "$name"; then
            kill "$(cat "$(pid_file "$name")")" 2>/dev/null || true
            log "stopped $name"
        fi
    done
}

status() {
    for name in munged mariadb slurmdbd slurmctld slurmd; do
        if [[ $name == munged ]]; then pgrep -x munged >/dev/null && s=up || s=down
        elif running "$name"; then s=up
        else s=down; fi
        printf '%-10s %s\n' "$name" "$s"
    done
    sinfo -N -o '%N %t %c %m' 2>/dev/null || true
}

case "${1:-}" in
start) start ;;
stop) stop ;;
status) status ;;
*)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
