"""``tools/debian_packages.sh``'s ``install_debian_packages LOGFILE PACKAGE...``, the one place run.sh,
slurm/dev-cluster/start.sh and mlcube/container_engine.sh install Debian packages, run under ``bash`` as they run it.

Most tests put a fake ``apt-get`` first on PATH and point the policy-rc.d path (``BRATS_UGRIP_POLICY_RC_D``) into
``tmp_path``: they need neither root nor the network and touch nothing on the machine, and the fake ``apt-get``
records what the real one would have seen (the policy-rc.d answer, DEBIAN_FRONTEND, its arguments). One test runs the
real apt-get on a package that does not exist (root with apt only: it runs ``apt-get update``, installs nothing).
Installing a real package is opt-in: ``BRATS_UGRIP_APT_TEST_PACKAGE=tree`` (a package that is not installed; the
test purges it again).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

HELPER = Path(__file__).resolve().parents[1] / "tools" / "debian_packages.sh"
BASH = shutil.which("bash") or "/bin/bash"
REAL_POLICY = Path("/usr/sbin/policy-rc.d")

# Stands in for apt-get: records each call, and during `install` what invoke-rc.d would be told (policy-rc.d's exit
# status, 101 = forbidden) and DEBIAN_FRONTEND. FAKE_APT_FAIL=update|install makes that step fail like apt does
# (a message on stderr, status 100); FAKE_APT_HANG=1 makes `install` write $FAKE_APT_DIR/started and wait.
FAKE_APT = r"""#!/bin/bash
echo "$*" >>"$FAKE_APT_DIR/calls"
echo "fake apt-get $1 says hello"
if [[ $1 == install ]]; then
    policy=$BRATS_UGRIP_POLICY_RC_D
    if [[ -e $policy ]]; then "$policy" start; echo "policy $?"; else echo "policy none"; fi >"$FAKE_APT_DIR/policy"
    echo "frontend ${DEBIAN_FRONTEND:-unset}" >"$FAKE_APT_DIR/frontend"
    if [[ ${FAKE_APT_HANG:-} == 1 ]]; then touch "$FAKE_APT_DIR/started"; sleep 60; fi
fi
if [[ ${FAKE_APT_FAIL:-} == "$1" ]]; then echo "E: fake $1 failure" >&2; exit 100; fi
"""


@pytest.fixture
def fake_apt(tmp_path):
    """Folder with the fake apt-get in bin/, and the environment that puts it first on PATH."""
    (tmp_path / "bin").mkdir()
    apt = tmp_path / "bin" / "apt-get"
    apt.write_text(FAKE_APT)
    apt.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "FAKE_APT_DIR": str(tmp_path),
           "BRATS_UGRIP_POLICY_RC_D": str(tmp_path / "policy-rc.d")}
    env.pop("DEBIAN_FRONTEND", None)
    return tmp_path, env


def run_helper(env: dict, *args: str, script: str = 'install_debian_packages "$@"', timeout: float = 60):
    """Source the helper in a fresh bash, run ``script`` (the call by default) with ``args`` as "$@"."""
    return subprocess.run([BASH, "-c", f'source "{HELPER}"\n{script}', "bash", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_installs_with_policy_that_forbids_starting_daemons_and_removes_it(fake_apt):
    folder, env = fake_apt
    log = folder / "apt.log"
    log.write_text("an older run's log\n")
    result = run_helper(env, str(log), "pkg-a", "pkg-b")
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("", "")  # the callers print their own messages
    assert (folder / "calls").read_text().splitlines() == [
        "update -qq", "install -y -qq --no-install-recommends pkg-a pkg-b"]
    assert (folder / "policy").read_text().strip() == "policy 101"
    assert (folder / "frontend").read_text().strip() == "frontend noninteractive"
    assert not (folder / "policy-rc.d").exists()
    assert log.read_text() == "fake apt-get update says hello\nfake apt-get install says hello\n"  # truncated first


@pytest.mark.parametrize("existing", [False, True], ids=["own-policy", "existing-policy"])
@pytest.mark.parametrize("step,status", [("update", 1), ("install", 2)])
def test_failure_returns_which_step_failed_with_apts_error_in_the_log(fake_apt, step, status, existing):
    folder, env = fake_apt
    policy = folder / "policy-rc.d"
    if existing:
        policy.write_text("#!/bin/sh\n# the machine's own\nexit 101\n")
        policy.chmod(0o755)
    log = folder / "apt.log"
    result = run_helper({**env, "FAKE_APT_FAIL": step}, str(log), "pkg")
    assert result.returncode == status
    assert f"E: fake {step} failure" in log.read_text()
    assert len((folder / "calls").read_text().splitlines()) == status  # no install after a failed update
    if existing:
        assert policy.read_text() == "#!/bin/sh\n# the machine's own\nexit 101\n"  # left as it was
    else:
        assert not policy.exists()


def test_existing_policy_is_used_and_left_in_place(fake_apt):
    folder, env = fake_apt
    policy = folder / "policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    result = run_helper(env, str(folder / "apt.log"), "pkg", script='install_debian_packages "$@"; trap -p EXIT')
    assert result.returncode == 0, result.stderr
    assert (folder / "policy").read_text().strip() == "policy 101"
    assert policy.read_text() == "#!/bin/sh\nexit 101\n"
    assert result.stdout == ""  # no EXIT trap set, none left


def test_no_apt_get_does_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    env = {"PATH": str(tmp_path / "empty"), "BRATS_UGRIP_POLICY_RC_D": str(tmp_path / "policy-rc.d")}
    result = run_helper(env, str(tmp_path / "apt.log"), "pkg")
    assert result.returncode == 127
    assert (result.stdout, result.stderr) == ("", "")
    assert not (tmp_path / "apt.log").exists() and not (tmp_path / "policy-rc.d").exists()


def test_unwritable_log_fails_before_apt(fake_apt):
    folder, env = fake_apt
    result = run_helper(env, str(folder / "no-such-dir" / "apt.log"), "pkg")
    assert result.returncode == 1
    assert not (folder / "calls").exists() and not (folder / "policy-rc.d").exists()


def test_callers_exit_trap_is_kept_and_runs_with_the_scripts_status(fake_apt):
    folder, env = fake_apt
    script = """trap 'echo "caller trap, status $?" >"$FAKE_APT_DIR/trap"' EXIT
install_debian_packages "$@"; echo "returned $?"
trap -p EXIT
exit 3"""
    result = run_helper({**env, "FAKE_APT_FAIL": "install"}, str(folder / "apt.log"), "pkg", script=script)
    assert result.returncode == 3
    restored = """trap -- 'echo "caller trap, status $?" >"$FAKE_APT_DIR/trap"' EXIT"""
    assert result.stdout.splitlines() == ["returned 2", restored]
    assert (folder / "trap").read_text() == "caller trap, status 3\n"
    assert not (folder / "policy-rc.d").exists()


def _default_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_interrupted_install_removes_the_policy_and_runs_the_callers_trap(fake_apt, sig):
    """Killed mid-install, as Ctrl-C or a CI timeout kills the process group: the policy-rc.d written for the install
    must not stay behind (it would stop every later package's daemon from starting), and the caller's trap runs."""
    folder, env = fake_apt
    script = """trap 'echo "caller trap ran" >"$FAKE_APT_DIR/trap"' EXIT
install_debian_packages "$@"
echo "not reached" >"$FAKE_APT_DIR/after\""""
    # Default dispositions in the child: a shell started in the background (as CI may start this suite) ignores
    # SIGINT, and a non-interactive bash cannot trap a signal ignored on entry, so the test would only hang.
    proc = subprocess.Popen([BASH, "-c", f'source "{HELPER}"\n{script}', "bash", str(folder / "apt.log"), "pkg"],
                            env={**env, "FAKE_APT_HANG": "1"}, start_new_session=True, preexec_fn=_default_signals)
    try:
        deadline = time.monotonic() + 30
        while not (folder / "started").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the fake apt-get install never started"
            time.sleep(0.05)
        assert (folder / "policy-rc.d").exists()
        os.killpg(proc.pid, sig)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (folder / "policy-rc.d").exists()
    assert (folder / "trap").read_text() == "caller trap ran\n"
    assert not (folder / "after").exists()


def _root_with_apt() -> bool:
    return os.geteuid() == 0 and shutil.which("apt-get") is not None and shutil.which("dpkg") is not None


def _installed(package: str) -> bool:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return out.returncode == 0 and "ok installed" in out.stdout


@pytest.mark.skipif(not _root_with_apt(), reason="needs root and apt-get (it runs the real apt-get update)")
def test_real_apt_unknown_package_fails_in_install(tmp_path):
    """The real apt-get: `apt-get update` runs, `install` of a package no archive has fails (status 2) with apt's
    error in the log. Installs nothing; the policy-rc.d path points into tmp_path, so the machine's is not touched."""
    policy = tmp_path / "policy-rc.d"
    real_policy_before = REAL_POLICY.exists()
    log = tmp_path / "apt.log"
    env = {**os.environ, "BRATS_UGRIP_POLICY_RC_D": str(policy)}
    result = run_helper(env, str(log), "brats-ugrip-no-such-package", timeout=600)
    if result.returncode == 1:
        pytest.skip(f"apt-get update failed here (network, mirror or apt lock): {log.read_text()[-500:]}")
    assert result.returncode == 2
    assert "Unable to locate package brats-ugrip-no-such-package" in log.read_text()
    assert not policy.exists()
    assert REAL_POLICY.exists() == real_policy_before


@pytest.mark.skipif(not (_root_with_apt() and os.environ.get("BRATS_UGRIP_APT_TEST_PACKAGE")),
                    reason="installs a real package: opt in with BRATS_UGRIP_APT_TEST_PACKAGE=<a package not installed>")
def test_real_apt_installs_and_purges(tmp_path):
    package = os.environ["BRATS_UGRIP_APT_TEST_PACKAGE"]
    if _installed(package):
        pytest.skip(f"{package} is already installed; name one that is not (the test purges it afterwards)")
    env = {k: v for k, v in os.environ.items() if k != "BRATS_UGRIP_POLICY_RC_D"}  # the real /usr/sbin/policy-rc.d
    before = REAL_POLICY.read_bytes() if REAL_POLICY.exists() else None
    try:
        result = run_helper(env, str(tmp_path / "apt.log"), package, timeout=600)
        assert result.returncode == 0, (tmp_path / "apt.log").read_text()
        assert _installed(package)
        assert (REAL_POLICY.read_bytes() if REAL_POLICY.exists() else None) == before
    finally:
        subprocess.run(["apt-get", "purge", "-y", "-qq", package], env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                       capture_output=True, timeout=300)
    assert not _installed(package)
