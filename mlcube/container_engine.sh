#!/usr/bin/env bash
# Start a Docker engine for the `container` tests and for building/running model packages, on a Debian 12 machine,
# as root, without systemd (as slurm/dev-cluster/start.sh starts SLURM's daemons).
#
# Contract: exits 0 once `docker info` answers (an engine that already answers is only reported); exits 1 with one
# "[docker-dev] ERROR: ..." line saying what to do, plus the tail of dockerd's log, when it cannot. It installs
# Debian's docker.io when dockerd is missing (apt, root), then starts dockerd in the background with the overlay2
# storage driver, falling back to vfs (slower, more disk, works on any file system) when overlay2 cannot start.
# Logs and the pid file live in $BRATS_UGRIP_DOCKER_DIR (default /tmp/brats-ugrip-docker); images in dockerd's
# default data root (/var/lib/docker). Stop it with: kill "$(cat /tmp/brats-ugrip-docker/dockerd.pid)".
#
# Usage: mlcube/container_engine.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../tools/debian_packages.sh"   # install_debian_packages

STATE_DIR=${BRATS_UGRIP_DOCKER_DIR:-/tmp/brats-ugrip-docker}
PID_FILE=$STATE_DIR/dockerd.pid
LOG=$STATE_DIR/dockerd.log
started_at=$SECONDS

say() { printf '[docker-dev] %s\n' "$*"; }
die() {  # die MESSAGE [LOG]: explain, show the log's tail, exit 1
    printf '[docker-dev] ERROR: %s\n' "$1" >&2
    if [[ -n ${2:-} && -f $2 ]]; then
        printf -- '--- last lines of %s ---\n' "$2" >&2
        tail -n 20 "$2" >&2
    fi
    exit 1
}
alive() { [[ $1 =~ ^[0-9]+$ && -r /proc/$1/stat && $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) != Z ]]; }
answers() { timeout 20 docker info >/dev/null 2>&1; }

if command -v docker >/dev/null && answers; then
    say "engine answers: $(docker info --format '{{.ServerVersion}}, storage {{.Driver}}' 2>/dev/null)"
    exit 0
fi

if [[ $EUID -ne 0 ]]; then
    die "no Docker engine answers and starting one needs root; start Docker yourself (sudo systemctl start docker) \
and make sure \`docker info\` works for $(id -un) (e.g. sudo usermod -aG docker $(id -un)), or run this as root"
fi
mkdir -p "$STATE_DIR"

if ! command -v dockerd >/dev/null; then
    command -v apt-get >/dev/null ||
        die "dockerd is not installed and there is no apt-get; install Docker Engine (https://docs.docker.com/engine/install/)"
    say "installing Debian's docker.io"
    # install_debian_packages keeps invoke-rc.d from starting the daemon during the install (no systemd here): this
    # script starts it.
    install_debian_packages "$STATE_DIR/apt.log" docker.io ||
        die "apt-get install docker.io failed; check the apt sources and the network to the Debian mirror" "$STATE_DIR/apt.log"
fi

start_dockerd() {  # start_dockerd DRIVER: start dockerd in the background; 0 once `docker info` answers
    local driver=$1 pid deadline
    say "starting dockerd (storage driver $driver; log $LOG)"
    # setsid: the daemon outlives this shell and the CI step that ran it. A stale pid file stops dockerd from
    # starting, and one of ours names no live process here (checked above), so it goes.
    rm -f "$PID_FILE" /var/run/docker.pid
    setsid -f dockerd --storage-driver="$driver" --pidfile="$PID_FILE" </dev/null >>"$LOG" 2>&1
    deadline=$((SECONDS + 60))
    until answers; do
        pid=$(cat "$PID_FILE" 2>/dev/null || true)
        # dockerd writes its pid file early; without one after a few seconds, or once it has exited, it failed.
        if ((SECONDS > deadline)) || { [[ -n $pid ]] && ! alive "$pid"; }; then
            [[ -n $pid ]] && alive "$pid" && kill -TERM "$pid" 2>/dev/null
            return 1
        fi
        sleep 0.5
    done
}

pid=$(cat "$PID_FILE" 2>/dev/null || true)
if [[ -n $pid ]] && alive "$pid"; then
    # Ours, started earlier, but not answering (yet): give it the same time to come up.
    deadline=$((SECONDS + 60))
    until answers; do
        ((SECONDS < deadline)) || die "dockerd ($pid) runs but \`docker info\` does not answer; kill $pid and run this again" "$LOG"
        sleep 0.5
    done
elif [[ -S /var/run/docker.sock ]] && pgrep -x dockerd >/dev/null; then
    die "a dockerd not started by this script runs but does not answer; check it (docker info) or stop it first" "$LOG"
else
    : >"$LOG"
    if ! start_dockerd overlay2; then
        say "overlay2 did not start (see $LOG); falling back to the vfs storage driver"
        sleep 1
        start_dockerd vfs || die "dockerd did not start with overlay2 or vfs; it needs root with CAP_SYS_ADMIN \
(a privileged container or a VM) and cgroups; read the log below" "$LOG"
    fi
fi
say "engine answers: $(docker info --format '{{.ServerVersion}}, storage {{.Driver}}' 2>/dev/null)" \
    "(ready in $((SECONDS - started_at)) s)"
