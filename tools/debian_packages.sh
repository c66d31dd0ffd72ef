# Sourced (not run) by run.sh, slurm/dev-cluster/start.sh and mlcube/container_engine.sh: the one way this project
# installs Debian packages (Debian 12, as root, usually in a container without systemd). It lives here, not in
# slurm/ or mlcube/, because all three use it.
#
# install_debian_packages LOGFILE PACKAGE...
#   apt-get update, then apt-get install PACKAGE..., quietly, without recommends, both commands' output (stdout and
#   stderr) in LOGFILE (truncated first). Returns
#     0    installed;
#     1    apt-get update failed (or LOGFILE or policy-rc.d could not be written);
#     2    apt-get install failed;
#     127  there is no apt-get: nothing was done, LOGFILE is not touched.
#   It prints nothing itself: each caller says what failed in its own words, with LOGFILE's tail where it shows logs.
#   While it runs, /usr/sbin/policy-rc.d answers 101 ("action forbidden"), so that the packages' postinst scripts do
#   not start their daemons (invoke-rc.d asks it first): the callers start theirs themselves, with their own
#   configs, and without systemd a daemon started by a postinst is one nobody stops. A policy-rc.d that was there
#   before (Docker's Debian images ship one) is left as it is; the one written here is removed on return, and by an
#   EXIT trap if the shell exits or is killed (INT, TERM, HUP) meanwhile. That trap runs the caller's EXIT trap after
#   its own and the caller's trap is put back on return, so a caller may set its own before or after the call.

install_debian_packages() {
    local log=$1 rc=0 own_policy= prev_exit_trap= prev_exit_cmd= quoted
    # The path is a variable only so that the tests can check the policy-rc.d handling without root and without
    # touching the machine's file; invoke-rc.d reads /usr/sbin/policy-rc.d only.
    local policy=${BRATS_UGRIP_POLICY_RC_D:-/usr/sbin/policy-rc.d}
    # No debconf question may wait for an answer nobody types. local -x: exported to apt, gone again on return.
    local -x DEBIAN_FRONTEND=noninteractive
    shift
    command -v apt-get >/dev/null || return 127
    : >"$log" || return 1   # the shell says why on stderr

    if [[ ! -e $policy && ! -L $policy ]]; then
        # The trap first, then the file: an interrupt in between leaves nothing behind. `trap -p` in a command
        # substitution reports this shell's trap; its output is quoted for the shell, hence the eval.
        prev_exit_trap=$(trap -p EXIT)
        if [[ -n $prev_exit_trap ]]; then
            local -a words
            eval "words=($prev_exit_trap)"   # trap -- 'COMMAND' EXIT
            prev_exit_cmd=${words[2]}
        fi
        printf -v quoted %q "$policy"
        trap "_debian_packages_drop_policy $quoted; $prev_exit_cmd" EXIT
        # noclobber: created only if still absent, so a policy-rc.d that appeared meanwhile is not overwritten.
        if (set -C; printf '#!/bin/sh\n# Written by install_debian_packages (brats-ugrip), removed after it.\nexit 101\n' \
            >"$policy") 2>>"$log"; then
            own_policy=1
            chmod 755 "$policy" 2>>"$log" || rc=1
        else
            rc=1
        fi
        if [[ -z $own_policy ]]; then   # not ours after all: put the caller's trap back, leave the file alone
            eval "${prev_exit_trap:-trap - EXIT}"
        fi
    fi

    if ((rc == 0)); then
        if ! apt-get update -qq >>"$log" 2>&1; then
            rc=1
        elif ! apt-get install -y -qq --no-install-recommends "$@" >>"$log" 2>&1; then
            rc=2
        fi
    fi

    if [[ -n $own_policy ]]; then
        rm -f -- "$policy"
        eval "${prev_exit_trap:-trap - EXIT}"
    fi
    return "$rc"
}

# The EXIT trap's first step: remove the policy-rc.d written above, keeping $? for the caller's trap that follows
# (a trap that reports the exit status must see the script's, not rm's).
_debian_packages_drop_policy() {
    local status=$?
    rm -f -- "$1"
    return "$status"
}
