"""A second process that keeps ``threads`` cores busy (a torch float matmul loop), for measuring how
much each candidate slows down when it shares the cores, as it does on a real server.

    with busy_cores(2):
        ...   # time the candidates here

Used by ``python -m graphopt.bench.integer_only load``, which also reports with ``CoreShares`` how many cores
each candidate and the load process got during the candidate's calls (the scheduler decides the split).
"""
from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

_LOOP = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
a = torch.randn(512, 512)
print("busy", flush=True)
while True:
    a = torch.tanh(a @ a)
"""


@contextlib.contextmanager
def busy_cores(threads: int):
    """Run the matmul loop on ``threads`` threads in a child process for the body of the ``with``;
    waits until the loop runs, and ends that child (only it) afterwards."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    child = subprocess.Popen([sys.executable, "-c", _LOOP, str(threads)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        if child.stdout.readline().strip() != "busy":
            raise RuntimeError(f"the load process exited with {child.wait()} before it started its loop")
        yield child
    finally:
        child.terminate()
        child.wait()


class CoreShares:
    """Wraps candidates' calls to add up, per candidate, the CPU seconds of this process and of the load process
    ``pid`` (None: no load process) while its calls ran, over their wall seconds: the cores each side got (Linux:
    the load process's time comes from /proc, in clock ticks, so summed over many calls)."""

    def __init__(self, pid: int | None):
        self._stat = Path(f"/proc/{pid}/stat") if pid else None
        self._sums: dict[str, list[float]] = {}

    def wrap(self, name: str, call):
        sums = self._sums.setdefault(name, [0.0, 0.0, 0.0])

        def timed_call():
            mine, theirs, wall = self._mine(), self._theirs(), time.perf_counter()
            call()
            sums[0] += self._mine() - mine
            sums[1] += self._theirs() - theirs
            sums[2] += time.perf_counter() - wall
        return timed_call

    def cores(self) -> dict[str, dict[str, float]]:
        return {k: {"this_process": o / w, "load_process": t / w} for k, (o, t, w) in self._sums.items() if w > 0}

    @staticmethod
    def _mine() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def _theirs(self) -> float:
        if self._stat is None:
            return 0.0
        fields = self._stat.read_text().rsplit(")", 1)[1].split()     # after the command name, which may hold spaces
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")     # utime + stime
