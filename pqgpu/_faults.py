"""Test-only fault injection, so crash-safety tests can kill a process at an exact point.

PQGPU_FAULT="<point>:<chunk>:<action>" with point one of before-write, after-codes (inside a chunk write,
codes written but ids/done not yet), driver-after (in the driver, once <chunk> chunks are complete), and for
export-postgres (<chunk> is the shard number) pg-before-rename (the shard's temporary file written and synced,
not renamed), pg-after-rename (renamed, not yet in the manifest), pg-before-complete (every shard recorded, the
export not yet marked complete);
action kill (SIGKILL this process) or raise. PQGPU_FAULT_ONCE=<file> fires only when <file> is absent
(and creates it), so a restarted worker does not die again. PQGPU_FAULT_DELAY=<seconds> sleeps before each
chunk write. Unset in normal use: one dict lookup.
"""

from __future__ import annotations

import os
import signal
import time


def fault_point(point: str, index: int) -> None:
    spec = os.environ.get("PQGPU_FAULT")
    if not spec:
        return
    delay = os.environ.get("PQGPU_FAULT_DELAY")
    if delay and point == "before-write":  # slow tasks down so a kill lands mid-run
        time.sleep(float(delay))
    where, chunk, action = spec.split(":")
    if where != point or int(chunk) != index:
        return
    once = os.environ.get("PQGPU_FAULT_ONCE")
    if once:
        try:
            fd = os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # atomic: only one process fires
        except FileExistsError:
            return
        os.close(fd)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected fault at {point} {index}")
