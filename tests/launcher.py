"""Start a test worker module on several ranks, bounded in time, and read what each rank wrote.

A worker (`tests/ring_worker.py`, `tests/fsdp_ring_worker.py`) runs as
``python -m <module> --rank R --world W <args>`` and keeps
``<out>/rank<R>.json`` up to date: ``{"results": {case: error or None},
"current": case being run or None}``. A launch that outlives its timeout is
killed, and the failure names the case each rank was stuck in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tail(path: str, chars: int = 3000) -> str:
    try:
        with open(path) as f:
            return f.read()[-chars:]
    except OSError:
        return ""


def launch_ranks(
    module: str, world: int, out: str, args: list[str], timeout: float,
    ranks: list[int] | None = None, env: dict[str, str] | None = None,
) -> dict:
    """Run `module` on `ranks` (default: all of `world`) with `args`, writing into `out`.

    Returns ``{"results": {rank: {case: error|None}}, "failure": str|None, "seconds": float}``.
    """
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **(env or {}))
    ranks = list(range(world)) if ranks is None else ranks
    start = time.monotonic()
    procs = []
    for rank in ranks:
        cmd = [sys.executable, "-m", module, "--rank", str(rank), "--world", str(world), *args]
        log = open(os.path.join(out, f"rank{rank}.log"), "w")
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = start + timeout
    failure = None
    for proc, _ in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            failure = f"ranks still running after {timeout:.0f} s (hang?)"
            break
    for proc, log in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    results, current = {}, {}
    for rank, (proc, _) in zip(ranks, procs):
        path = os.path.join(out, f"rank{rank}.json")
        state = json.load(open(path)) if os.path.exists(path) else {"results": {}, "current": None}
        results[rank], current[rank] = state["results"], state["current"]
        if failure is None and proc.returncode != 0:
            failure = f"rank {rank} exited with {proc.returncode}"
    if failure:
        stuck = ", ".join(f"rank {r}: {c!r}" for r, c in current.items() if c)
        logs = "\n".join(f"--- rank {r} log ---\n{_tail(os.path.join(out, f'rank{r}.log'))}" for r in ranks)
        failure = f"{failure}; unfinished cases: {stuck or 'none'}\n{logs}"
    return {"results": results, "failure": failure, "seconds": round(time.monotonic() - start, 1)}


def case_failures(run: dict, world: int, case: str) -> list[str]:
    """What went wrong with `case` on each rank of a launch (empty: passed everywhere)."""
    failures = []
    for rank in range(world):
        results = run["results"][rank]
        if case not in results:
            failures.append(f"rank {rank}: did not run ({run['failure']})")
        elif results[case] is not None:
            failures.append(f"rank {rank}:\n{results[case]}")
    return failures
