"""Logging wrappers in front of the real SLURM commands: how the SLURM tests and ``bench/monitor_slurm.py`` count
what a sweep asks of the scheduler (one sbatch per resource set, one sacct per poll).

:func:`write_wrappers` writes, for each command, an executable of the same name that appends ``<command>
<arguments>`` to one log and then ``exec``\\ s the real command: nothing is faked. Put the folder first on
``PATH`` (jobs inherit it too); :class:`CallLog` reads the log.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

COMMANDS = ("sbatch", "sacct", "squeue", "scancel")


@dataclass(frozen=True)
class CallLog:
    """The calls the wrappers logged, oldest first."""

    path: Path

    def calls(self, command: str) -> list[str]:
        """The arguments of every call of ``command`` so far."""
        lines = self.path.read_text().splitlines()
        return [args for name, _, args in (line.partition(" ") for line in lines) if name == command]

    def count(self, command: str) -> int:
        return len(self.calls(command))

    def submissions(self) -> list[str]:
        """sbatch calls that submitted jobs (the launcher's ``--test-only`` checks left out)."""
        return [args for args in self.calls("sbatch") if "--test-only" not in args]


def write_wrappers(folder: Path, commands: tuple[str, ...] = COMMANDS) -> CallLog:
    """Write the wrappers of ``commands`` into ``folder`` (created) and return their empty log.

    Raises:
        FileNotFoundError: one of the commands is not on PATH (no SLURM client here).
    """
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "calls.log"
    log.write_text("")
    for command in commands:
        real = shutil.which(command)
        if real is None:
            raise FileNotFoundError(f"{command} is not on PATH: start the dev cluster (slurm/dev-cluster/start.sh)")
        # One short line per call, appended (O_APPEND): calls from several processes do not interleave.
        (folder / command).write_text(f'#!/bin/bash\necho "{command} $*" >> {log}\nexec {real} "$@"\n')
        (folder / command).chmod(0o755)
    return CallLog(log)
