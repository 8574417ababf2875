"""Reads that reach the device, not the page cache.

A warm page cache makes any flash design look fast, so the store is read with
O_DIRECT: the kernel DMAs straight into our buffer, which needs the buffer
address, the file offset and the length aligned to the device's logical block
size. Anonymous `mmap` buffers are page aligned (4096), and we never align to
less than 4096, so one alignment serves both.

Some filesystems cannot read directly. Older kernels refuse O_DIRECT on tmpfs
(EINVAL at open or on the first read); newer ones accept it, but a tmpfs or
ramfs file *is* page cache, so there is no device to reach either way. In both
cases `DirectFile` falls back to buffered reads followed by
`posix_fadvise(POSIX_FADV_DONTNEED)` on the bytes just read, and warns: the page
cache is then only dropped after each read, not bypassed (and on tmpfs not even
dropped).

Pure Python + numpy; `os.preadv` releases the GIL, so reads on a thread pool
overlap.
"""
from __future__ import annotations

import errno
import logging
import mmap
import os
import re
import warnings

import numpy as np

logger = logging.getLogger(__name__)

MIN_ALIGNMENT_BYTES = 4096  # page size: what an mmap buffer is aligned to anyway
DEFAULT_LOGICAL_BLOCK_BYTES = 4096  # when sysfs does not tell (overlayfs, device mapper, containers)

# Filesystems whose files live in memory: O_DIRECT, if accepted, reads no device.
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "devtmpfs", "hugetlbfs"})


class PageCacheBypassWarning(UserWarning):
    """Direct reads are unavailable for a file: page cache dropped, not bypassed."""


def logical_block_size_bytes(path: str) -> int:
    """Logical block size of the block device holding `path`, from sysfs; 4096 when not findable."""
    st_dev = os.stat(path).st_dev
    device_dir = f"/sys/dev/block/{os.major(st_dev)}:{os.minor(st_dev)}"
    # A partition has no queue/ of its own; its parent disk's queue applies.
    for queue_dir in (os.path.join(device_dir, "queue"), os.path.join(device_dir, "..", "queue")):
        try:
            with open(os.path.join(queue_dir, "logical_block_size"), encoding="ascii") as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            continue
    return DEFAULT_LOGICAL_BLOCK_BYTES


def filesystem_type(path: str) -> str:
    """Type of the filesystem mounted over `path` (longest mount point prefix in /proc/self/mounts)."""
    real_path = os.path.realpath(path)
    best_mount, best_type = "", "unknown"
    try:
        with open("/proc/self/mounts", encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                # /proc/mounts escapes space, tab, newline and backslash as octal (\040).
                mount_point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
                inside = real_path == mount_point or real_path.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) >= len(best_mount):
                    best_mount, best_type = mount_point, fields[2]
    except OSError:
        pass
    return best_type


def aligned_buffer(size_bytes: int) -> np.ndarray:
    """A page-aligned (size_bytes,) uint8 array over anonymous mmap memory.

    The pages are faulted in now (MAP_POPULATE), so the first read into the
    buffer does not pay for them and read timings measure the read. The array
    keeps the mmap alive; the mapping is released when the last view of it is
    garbage collected.
    """
    if size_bytes <= 0:
        raise ValueError(f"aligned buffer size must be positive, got {size_bytes} bytes")
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    mapping = mmap.mmap(-1, size_bytes, flags=flags)
    buffer = np.frombuffer(mapping, dtype=np.uint8)  # (size_bytes,)
    assert buffer.ctypes.data % mmap.PAGESIZE == 0, "anonymous mmap is page aligned by definition"
    return buffer


class DirectFile:
    """A file opened for aligned reads that bypass the page cache (or drop it, on fallback).

    `direct` says which mode the probe chose; `alignment_bytes` is what every
    offset, length and buffer address passed to `read_into` must be a multiple of.
    """

    def __init__(self, path: str):
        self.path = path
        self.alignment_bytes = max(MIN_ALIGNMENT_BYTES, logical_block_size_bytes(path))
        self.size_bytes = os.stat(path).st_size
        self.fallback_reason: str | None = None
        self._fd = -1
        self._fd = self._open_direct_or_fallback()
        self.direct = self.fallback_reason is None

    def _open_direct_or_fallback(self) -> int:
        fs_type = filesystem_type(self.path)
        if fs_type in MEMORY_FILESYSTEMS:
            return self._open_buffered(f"{self.path} is on {fs_type}, a memory filesystem: no device to read directly")
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            return self._open_buffered(f"the filesystem of {self.path} ({fs_type}) refuses O_DIRECT at open ({exc})")
        # Some filesystems accept the flag at open and refuse the first read.
        probe = aligned_buffer(self.alignment_bytes)
        try:
            os.preadv(fd, [memoryview(probe)], 0)
        except OSError as exc:
            os.close(fd)
            if exc.errno != errno.EINVAL:
                raise
            return self._open_buffered(f"the filesystem of {self.path} ({fs_type}) refuses O_DIRECT reads ({exc})")
        return fd

    def _open_buffered(self, reason: str) -> int:
        self.fallback_reason = reason
        message = (
            f"{reason}; falling back to buffered reads with posix_fadvise(DONTNEED) after each read: "
            "the page cache is only dropped, not bypassed, so read timings and /proc/<pid>/io are less honest. "
            "Put the store on a disk filesystem (ext4, xfs, btrfs) for direct reads."
        )
        warnings.warn(message, PageCacheBypassWarning, stacklevel=4)
        logger.warning(message)
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        # Pages cached before we opened would make the first reads look free.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return fd

    def read_into(self, offset_bytes: int, buffer: memoryview | np.ndarray, min_bytes: int | None = None) -> int:
        """Fill `buffer` from `offset_bytes`; returns the bytes read.

        Offset, buffer length and address must be multiples of `alignment_bytes`.
        A read may stop early only at end of file, and must then still have
        delivered `min_bytes` (default: the whole buffer), else it raises
        EOFError: the file is shorter than its layout says.
        """
        view = memoryview(buffer)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        length_bytes = view.nbytes
        min_bytes = length_bytes if min_bytes is None else min_bytes
        if offset_bytes % self.alignment_bytes or length_bytes % self.alignment_bytes:
            raise ValueError(
                f"direct read of {length_bytes} bytes at offset {offset_bytes} is not aligned to "
                f"{self.alignment_bytes} bytes; align offset and length with protocol.store_format.align_up/down"
            )
        done_bytes = 0
        while done_bytes < length_bytes:
            got_bytes = os.preadv(self._fd, [view[done_bytes:]], offset_bytes + done_bytes)
            done_bytes += got_bytes
            # A short read is end of file; a partial block read marks it too (O_DIRECT cannot resume there).
            if got_bytes == 0 or got_bytes % self.alignment_bytes:
                break
        if not self.direct:
            os.posix_fadvise(self._fd, offset_bytes, length_bytes, os.POSIX_FADV_DONTNEED)
        if done_bytes < min_bytes:
            raise EOFError(
                f"{self.path}: wanted {min_bytes} bytes at offset {offset_bytes} but the file ends after "
                f"{done_bytes}; the file is truncated (re-run `flashllm convert`)"
            )
        return done_bytes

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        """The open descriptor, for reads issued elsewhere (AIO); same alignment rules as read_into."""
        if self._fd < 0:
            raise ValueError(f"{self.path} is closed")
        return self._fd

    def __enter__(self) -> "DirectFile":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
