"""Start a test worker module on several ranks, bounded in time, and read what each rank wrote.

A worker (`tests/ring_worker.py`, `tests/fsdp_ring_worker.py`) runs as
``python -m <module> --rank R --world W <args>`` and keeps
``<out>/rank<R>.json`` up to date: ``{"results": {case: error or None},
"current": case being run or None}`` (`RankResults`). A launch that outlives its timeout is
killed, and the failure names the case each rank was stuck in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from typing import Callable

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


class RankResults:
    """A worker rank's side: runs cases one by one, catching failures, and keeps
    ``<out>/rank<R>.json`` up to date for `launch_ranks` (rewritten as each case starts, with the
    results so far and the case now running, so a hang shows where it stopped, and at the end)."""

    def __init__(self, out: str, rank: int) -> None:
        self.path = os.path.join(out, f"rank{rank}.json")
        self.state: dict = {"results": {}, "current": None, "seconds": {}}

    def _write(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state, f)
        os.replace(tmp, self.path)

    def run(self, name: str, case: Callable[[], None]) -> None:
        """Run `case`, recording None or its failure's traceback, and its time."""
        self.state["current"] = name
        self._write()
        start = time.monotonic()
        try:
            case()
            self.state["results"][name] = None
        except Exception:  # noqa: BLE001 - every failure is reported to the test
            self.state["results"][name] = traceback.format_exc()
        self.state["seconds"][name] = round(time.monotonic() - start, 2)

    def finish(self) -> None:
        self.state["current"] = None
        self._write()
