"""A second process that keeps ``threads`` cores busy (a torch float matmul loop), for measuring how
much each candidate slows down when it shares the cores, as it does on a real server.

    with busy_cores(2):
        ...   # time the candidates here

Used by ``python -m graphopt.bench.integer_only load``.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

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
