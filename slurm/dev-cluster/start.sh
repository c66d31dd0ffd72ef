#!/usr/bin/env bash
# Start a single-node SLURM cluster with accounting (munge, MariaDB, slurmdbd, slurmctld, slurmd) on a
# Debian 12 machine, as root, without systemd. Used by the `slurm` tests and by developers.
#
# Idempotent: a cluster that already answers `sinfo` and `sacct` is only reported; a daemon whose pid file
# names a live process is left alone. Configs, databases, logs and pid files live under the state dir
# ($BRATS_UGRIP_SLURM_DIR, default /tmp/brats-ugrip-slurm); /etc/slurm/{slurm,slurmdbd}.conf are symlinks
# to it so that every client (sbatch, sacct, submitit) finds the cluster without extra environment.
#
# Usage: slurm/dev-cluster/start.sh        (stop with slurm/dev-cluster/stop.sh)
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
source "$(dirname "${BASH_SOURCE[0]}")/../../tools/debian_packages.sh"   # install_debian_packages
CLUSTER=brats-ugrip
NODE=localhost
NODE_CPUS=${BRATS_UGRIP_SLURM_CPUS:-8}   # more than the cores, so that several small jobs run at once
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
MYSQL_SOCKET=/run/mysqld/mysqld.sock     # the client library's default, which slurmdbd uses
started_at=$SECONDS

die() {  # die MESSAGE [LOG...]: explain, show the logs' tails, exit 1
    local msg=$1 f
    shift
    printf '[slurm-dev] ERROR: %s\n' "$msg" >&2
    for f in "$@"; do
        [[ -f $f ]] || continue
        printf -- '--- last lines of %s ---\n' "$f" >&2
        tail -n 25 "$f" >&2
    done
    exit 1
}

wait_for() {  # wait_for SECONDS COMMAND...: poll until COMMAND succeeds
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
}

sinfo_answers() { timeout 10 sinfo -h -o %P >/dev/null 2>&1; }
sacct_answers() {
    local out
    out=$(timeout 10 sacct -n -X -S now-1minutes 2>&1) || return 1
    [[ $out != *"disabled"* ]]
}
node_state() { timeout 10 sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n 1; }
node_idle() { [[ $(node_state) =~ ^(idle|mixed|allocated) ]]; }

summary() {
    say "cluster '$CLUSTER' is up (state dir $STATE_DIR, logs in $LOG)"
    if scontrol show config | grep -q '^TaskPlugin .*task/cgroup'; then
        say "job memory is enforced (task/cgroup): a job over its --mem ends OUT_OF_MEMORY"
    else
        say "job memory is not enforced (task/none: no writable cgroup-v1 memory controller)"
    fi
    sinfo -o '%10P %6a %10l %8T %5c %m' | sed 's/^/  /'
}

# (sinfo takes ~10 s to give up on a controller that is not there: ask only when ours runs.)
if running "$RUN/slurmctld.pid" && sinfo_answers && sacct_answers; then
    summary
    exit 0
fi

[[ $EUID -eq 0 ]] || die "must run as root (it installs packages and starts system daemons)"

mkdir -p "$ETC" "$LOG" "$RUN" "$STATE_DIR/ctld" "$STATE_DIR/slurmd" "$STATE_DIR/mysql"

# --- packages -------------------------------------------------------------------------------------
missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
done
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    # install_debian_packages keeps invoke-rc.d from starting daemons during the install: this script starts them
    # itself. Its status says which apt-get step failed (1 update, 2 install; 127: there is no apt-get at all).
    apt_status=0
    install_debian_packages "$LOG/apt.log" "${PACKAGES[@]}" || apt_status=$?
    case $apt_status in
        0) ;;
        2) die "apt-get install ${PACKAGES[*]} failed" "$LOG/apt.log" ;;
        127) die "apt-get update failed" ;;   # no log: nothing ran
        *) die "apt-get update failed" "$LOG/apt.log" ;;
    esac
fi

# --- configs --------------------------------------------------------------------------------------
mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
real_mb=$((mem_mb > 4096 ? mem_mb - 2048 : mem_mb * 3 / 4))   # leave room for the daemons and the OS

# --- memory enforcement ---------------------------------------------------------------------------
# Where root may make groups in a cgroup-v1 memory controller (these machines' containers mount one), jobs run
# under task/cgroup with ConstrainRAMSpace: a job over its --mem is killed by the kernel's OOM killer and ends
# OUT_OF_MEMORY, as on a production cluster. Elsewhere (cgroup v2 only, which SLURM 22.05 drives through systemd,
# absent here; read-only cgroups) jobs run under task/none: memory is not enforced, and the tests that need it skip
# and say so. BRATS_UGRIP_SLURM_CGROUP=none forces task/none.
memory_cgroup_v1_writable() {
    local probe=/sys/fs/cgroup/memory/brats-ugrip-probe.$$
    [[ -f /sys/fs/cgroup/memory/memory.limit_in_bytes ]] || return 1
    mkdir "$probe" 2>/dev/null || return 1
    rmdir "$probe"
}
if [[ ${BRATS_UGRIP_SLURM_CGROUP:-auto} != none ]] && memory_cgroup_v1_writable; then
    task_plugin=task/cgroup
    cat >"$ETC/cgroup.conf" <<EOF
# Written by slurm/dev-cluster/start.sh: memory limits only (no core binding, no device rules).
CgroupPlugin=cgroup/v1
CgroupMountpoint=/sys/fs/cgroup
ConstrainRAMSpace=yes
ConstrainSwapSpace=no
ConstrainCores=no
ConstrainDevices=no
EOF
else
    task_plugin=task/none
    rm -f "$ETC/cgroup.conf"
fi

cat >"$ETC/slurm.conf" <<EOF
# Written by slurm/dev-cluster/start.sh: a single-node dev cluster. Edits are overwritten on each start.
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
# Requeued jobs may start again once their credentials expired (default 120 s).
AuthInfo=cred_expire=10
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
# Processes are tracked through /proc; memory is enforced where a cgroup-v1 memory controller is writable (above).
ProctrackType=proctrack/linuxproc
TaskPlugin=$task_plugin
JobAcctGatherType=jobacct_gather/linux
MpiDefault=none
ReturnToService=2
# Memory is a consumable resource, so that a job's --mem is its cgroup limit (under task/cgroup); a job without
# --mem gets an equal share per CPU (DefMemPerCPU), not the whole node.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((real_mb / NODE_CPUS))
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
KillWait=5
InactiveLimit=0
# Advertise NODE_CPUS even if the machine has fewer cores.
SlurmdParameters=config_overrides
SlurmctldParameters=preempt_send_user_signal
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/none
MailProg=/bin/true
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$NODE_CPUS RealMemory=$real_mb State=UNKNOWN
# Jobs in 'urgent' preempt jobs in the other partitions: those get the user signal (USR2: submitit checkpoints)
# and are requeued; GraceTime leaves them time to save.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30
PartitionName=long Nodes=$NODE MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30
PartitionName=urgent Nodes=$NODE MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF

cat >"$ETC/slurmdbd.conf" <<EOF
# Written by slurm/dev-cluster/start.sh.
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
chmod 600 "$ETC/slurmdbd.conf"   # slurmdbd refuses a config others can read

mkdir -p /etc/slurm
for conf in slurm.conf slurmdbd.conf cgroup.conf; do
    target=/etc/slurm/$conf
    if [[ -e $target && ! -L $target ]]; then
        die "$target is a real file, not this dev cluster's symlink; move it away to use the dev cluster"
    fi
    if [[ -e $ETC/$conf ]]; then
        ln -sfn "$ETC/$conf" "$target"
    elif [[ -L $target ]]; then
        rm -f "$target"   # our cgroup.conf of an earlier start, when this start uses task/none
    fi
done

# --- munge ----------------------------------------------------------------------------------------
if ! running "$MUNGE_PID"; then
    [[ -s /etc/munge/munge.key ]] || mungekey --create >/dev/null
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 700 /var/log/munge /var/lib/munge
    runuser -u munge -- munged --force || die "munged did not start" /var/log/munge/munged.log
    say "munged started"
fi
wait_for 10 munge -n || die "munge does not answer" /var/log/munge/munged.log

# --- mariadb --------------------------------------------------------------------------------------
if ! running "$RUN/mariadb.pid"; then
    if [[ ! -d $STATE_DIR/mysql/mysql ]]; then
        mariadb-install-db --no-defaults --user=root --datadir="$STATE_DIR/mysql" --skip-test-db \
            >"$LOG/mariadb-install.log" 2>&1 || die "mariadb-install-db failed" "$LOG/mariadb-install.log"
    fi
    install -d -o mysql -g mysql /run/mysqld
    # Detached from this shell; unix socket only, root logs in through it (unix_socket auth).
    setsid -f mariadbd --no-defaults --user=root --datadir="$STATE_DIR/mysql" --socket="$MYSQL_SOCKET" \
        --skip-networking --pid-file="$RUN/mariadb.pid" --log-error="$LOG/mariadb.log" \
        --innodb-buffer-pool-size=256M --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1
    say "mariadbd started"
fi
wait_for 60 mariadb-admin --socket="$MYSQL_SOCKET" ping || die "mariadbd does not answer" "$LOG/mariadb.log"

# --- slurmdbd -------------------------------------------------------------------------------------
if ! running "$RUN/slurmdbd.pid"; then
    slurmdbd || die "slurmdbd did not start" "$LOG/slurmdbd.log"
    say "slurmdbd started"
fi
wait_for 60 timeout 10 sacctmgr -n list cluster || die "slurmdbd does not answer" "$LOG/slurmdbd.log"
if [[ -z $(sacctmgr -n -P list cluster "$CLUSTER" format=cluster 2>/dev/null) ]]; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster $CLUSTER failed" "$LOG/slurmdbd.log"
fi

# --- slurmctld, slurmd ----------------------------------------------------------------------------
# Without its saved state (first start, or state removed) slurmctld numbers jobs from 1 again, while accounting
# still holds the old jobs under those ids: sacct would answer for both. Start past accounting's highest id.
if ! running "$RUN/slurmctld.pid" && [[ ! -e $STATE_DIR/ctld/job_state ]]; then
    highest=$(timeout 30 sacct -a -X -n -P -o JobIDRaw -S 1970-01-01T00:00:00 -E now 2>/dev/null |
        awk -F'[_.]' '$1 ~ /^[0-9]+$/ && $1 + 0 > max {max = $1 + 0} END {print max + 0}')
    if ((highest > 0)); then
        echo "FirstJobId=$((highest + 1))" >>"$ETC/slurm.conf"
        say "no controller state: job ids start at $((highest + 1)), past accounting's highest ($highest)"
    fi
fi
if ! running "$RUN/slurmctld.pid"; then
    slurmctld || die "slurmctld did not start" "$LOG/slurmctld.log"
    say "slurmctld started"
fi
wait_for 60 sinfo_answers || die "slurmctld does not answer" "$LOG/slurmctld.log"
if ! running "$RUN/slurmd.pid"; then
    slurmd -N "$NODE" || die "slurmd did not start" "$LOG/slurmd.log"
    say "slurmd started"
fi
if ! wait_for 30 node_idle; then
    # A node left down/drained by an earlier run is put back into service once.
    scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
    wait_for 30 node_idle ||
        die "node $NODE is '$(node_state)', not idle" "$LOG/slurmd.log" "$LOG/slurmctld.log"
fi
wait_for 30 sacct_answers || die "sacct does not answer" "$LOG/slurmdbd.log" "$LOG/slurmctld.log"

summary
say "ready in $((SECONDS - started_at)) s"
