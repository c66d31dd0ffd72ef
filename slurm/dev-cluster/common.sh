# Shared by start.sh and stop.sh (sourced, not run): where the dev cluster keeps its state, and how to tell
# whether a daemon named by a pid file is running.
STATE_DIR=${BRATS_UGRIP_SLURM_DIR:-/tmp/brats-ugrip-slurm}
ETC=$STATE_DIR/etc
LOG=$STATE_DIR/log
RUN=$STATE_DIR/run
MUNGE_PID=/run/munge/munged.pid   # munged's default; its dir belongs to the munge user

say() { printf '[slurm-dev] %s\n' "$*"; }

# A process is alive unless it is gone or a zombie (dead, but never reaped on machines whose init does not
# reap), so a zombie counts as stopped.
alive() {
    [[ $1 =~ ^[0-9]+$ && -r /proc/$1/stat ]] || return 1
    [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) != Z ]]
}

# The pid file exists and names a live process.
running() { [[ -s $1 ]] && alive "$(<"$1")"; }
