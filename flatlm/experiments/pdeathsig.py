"""``python -m flatlm.experiments.pdeathsig PARENT_PID COMMAND...``: run COMMAND so that it gets SIGTERM when its
parent (ablate) dies, even by SIGKILL.

Linux's ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` survives ``exec``, so this process sets it on itself and then becomes
COMMAND. It is set here, in a fresh process, rather than in ``subprocess``'s ``preexec_fn`` (which is unsafe once the
parent has threads, as torch's thread pools are). SIGTERM makes ``flatlm train`` save a checkpoint and exit 0, so an
ablate killed outright leaves resumable cells, never orphans training on. If the parent is already gone by the time
the signal is armed (``getppid`` changed), COMMAND is not started. On other systems COMMAND runs without the guard.
The signal reaches this process only: under ``accelerate launch`` the launcher forwards it to its ranks.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def arm(parent: int) -> bool:
    """Ask for SIGTERM when the parent dies; False if the parent is already gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    return os.getppid() == parent


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m flatlm.experiments.pdeathsig PARENT_PID COMMAND...", file=sys.stderr)
        return 2
    if not arm(int(argv[0])):
        return 128 + signal.SIGTERM
    os.execvp(argv[1], argv[1:])
    return 127  # not reached: execvp replaces this process or raises


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
