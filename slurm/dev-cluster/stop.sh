#!/usr/bin/env bash
# Stop the dev cluster that slurm/dev-cluster/start.sh started: slurmd, slurmctld, slurmdbd, mariadbd, munged,
# each by the PID in its pid file (never by process name), without waiting on zombies. Idempotent.
# Jobs' slurmstepd processes are left alone; a restarted cluster picks them up again.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

stop() {  # stop NAME PIDFILE
    local name=$1 pid_file=$2 pid deadline
    if ! running "$pid_file"; then
        rm -f "$pid_file"
        return 0
    fi
    pid=$(<"$pid_file")
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 30))
    while alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
    if alive "$pid"; then
        say "$name ($pid) ignored SIGTERM for 30 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pid_file"
    say "$name stopped"
}

stop slurmd "$RUN/slurmd.pid"
stop slurmctld "$RUN/slurmctld.pid"
stop slurmdbd "$RUN/slurmdbd.pid"
stop mariadbd "$RUN/mariadb.pid"
stop munged "$MUNGE_PID"
say "dev cluster stopped (state and logs kept in $STATE_DIR)"
