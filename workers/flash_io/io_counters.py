"""Bytes a process really read from block devices, from /proc/<pid>/io.

`read_bytes` counts what reached the storage layer (page-cache hits excluded),
which is the honest figure for flash traffic; the reader's own counters only
say what it asked for.
"""
from __future__ import annotations


def process_read_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/io", encoding="ascii") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/io has no read_bytes line (kernel without task I/O accounting?)")
