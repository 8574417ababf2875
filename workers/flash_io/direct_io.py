"""Reads that reach the device, not the page cache.

A warm page cache makes any flash design look fast, so the store is read with
O_DIRECT: the kernel DMAs straight into our buffer, which needs the file
offset and length aligned to what the filesystem and device accept, and the
buffer address to what the device can DMA into. That alignment is asked, not
assumed (assuming 4 KiB on a disk of 512-byte blocks rounds a 3,456-byte
bundle out to 8 KiB half the time):

1. statx(STATX_DIOALIGN) (Linux >= 6.1): the filesystem's own answer, per
   file (stx_dio_offset_align, stx_dio_mem_align; STATX_DIO_READ_ALIGN where
   reads may be finer than writes);
2. else the block device's logical block size from sysfs
   (/sys/dev/block/MAJ:MIN/queue/logical_block_size, the partition's disk);
3. else a probe: the smallest power of two from 512 bytes up that an O_DIRECT
   read accepts as offset, length and buffer address.

Anonymous `mmap` buffers are page aligned, which covers any memory alignment
up to the page size.

Some filesystems cannot read directly. Older kernels refuse O_DIRECT on tmpfs
(EINVAL at open or on the first read); newer ones accept it, but a tmpfs or
ramfs file *is* page cache, so there is no device to reach either way. In both
cases `DirectFile` falls back to buffered reads followed by
`posix_fadvise(POSIX_FADV_DONTNEED)` on the bytes just read, and warns: the page
cache is then only dropped after each read, not bypassed (and on tmpfs not even
dropped). Buffered reads are aligned to the page, the unit the page cache reads.

Pure Python + numpy; `os.preadv` releases the GIL, so reads on a thread pool
overlap.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import re
import warnings
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

# The alignments a probe tries, smallest first: 512 is the smallest logical block any device has.
PROBE_ALIGNMENTS_BYTES = (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
# Where direct-I/O alignment may come from, in the order they are asked.
ALIGNMENT_SOURCES = ("statx", "block_device", "probe")

_AT_FDCWD = -100
_STATX_DIOALIGN = 0x2000  # Linux 6.1
_STATX_DIO_READ_ALIGN = 0x20000  # Linux 6.14: reads may need less alignment than writes
_STATX_BUFFER_BYTES = 256  # sizeof(struct statx)
# offsets in struct statx (<linux/stat.h>)
_STX_MASK, _STX_DIO_MEM_ALIGN, _STX_DIO_OFFSET_ALIGN, _STX_DIO_READ_OFFSET_ALIGN = 0, 152, 156, 180

# Filesystems whose files live in memory: O_DIRECT, if accepted, reads no device.
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "devtmpfs", "hugetlbfs"})


class PageCacheBypassWarning(UserWarning):
    """Direct reads are unavailable for a file: page cache dropped, not bypassed."""


@dataclass(frozen=True)
class DirectIoAlignment:
    """What O_DIRECT reads of one file must be aligned to, and who said so."""

    offset_bytes: int  # file offsets and lengths are multiples of this
    memory_bytes: int  # buffer addresses are multiples of this
    source: str  # "statx", "block_device", "probe", "page" (buffered reads) or "assumed" (nothing asked)


def statx_dio_alignment(path: str) -> DirectIoAlignment | None:
    """The file's direct-I/O alignment from statx(STATX_DIOALIGN); None where the kernel or libc cannot tell.

    A filesystem that answers but supports no direct I/O for the file gives offset_bytes == 0.
    """
    statx = getattr(ctypes.CDLL(None, use_errno=True), "statx", None)  # glibc >= 2.28
    if statx is None:
        return None
    buffer = ctypes.create_string_buffer(_STATX_BUFFER_BYTES)
    if statx(_AT_FDCWD, os.fsencode(path), 0, _STATX_DIOALIGN | _STATX_DIO_READ_ALIGN, buffer) != 0:
        return None  # ENOSYS (kernel < 4.11) or a sandbox that forbids it
    field = lambda offset: int.from_bytes(buffer.raw[offset:offset + 4], "little")  # noqa: E731
    mask = field(_STX_MASK)
    if not mask & _STATX_DIOALIGN:
        return None  # kernel < 6.1, or a filesystem that does not report it
    offset_bytes = field(_STX_DIO_OFFSET_ALIGN)
    read_offset_bytes = field(_STX_DIO_READ_OFFSET_ALIGN) if mask & _STATX_DIO_READ_ALIGN else 0
    if offset_bytes and read_offset_bytes:
        offset_bytes = min(offset_bytes, read_offset_bytes)
    return DirectIoAlignment(offset_bytes, field(_STX_DIO_MEM_ALIGN), "statx")


def logical_block_size_bytes(path: str) -> int | None:
    """Logical block size of the block device holding `path`, from sysfs; None when not findable
    (overlayfs, network filesystems, containers without /sys)."""
    st_dev = os.stat(path).st_dev
    device_dir = f"/sys/dev/block/{os.major(st_dev)}:{os.minor(st_dev)}"
    # A partition has no queue/ of its own; its parent disk's queue applies.
    for queue_dir in (os.path.join(device_dir, "queue"), os.path.join(device_dir, "..", "queue")):
        try:
            with open(os.path.join(queue_dir, "logical_block_size"), encoding="ascii") as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            continue
    return None


def probe_direct_alignment_bytes(fd: int, file_bytes: int) -> int | None:
    """The smallest alignment an O_DIRECT read of `fd` accepts, by trying; None if it accepts none.

    Each try reads `alignment` bytes at offset `alignment` (0 when the file is too short for that) into a
    buffer at address page + `alignment`, so offset, length and address are all aligned to exactly that.
    Only EINVAL means "not aligned enough"; other errors are raised.
    """
    largest = PROBE_ALIGNMENTS_BYTES[-1]
    buffer = aligned_buffer(2 * largest)
    for alignment in PROBE_ALIGNMENTS_BYTES:
        # a read past the end of the file, or of a hole, returns without checking alignment: stay inside data
        offset = alignment if file_bytes >= 2 * alignment else 0
        try:
            os.preadv(fd, [memoryview(buffer)[alignment : 2 * alignment]], offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            continue
        return alignment
    return None


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
    offset and length passed to `read_into` must be a multiple of, and
    `memory_alignment_bytes` what every buffer address must be; `alignment.source`
    says where they came from. alignment_sources: which of ALIGNMENT_SOURCES to
    ask, in order (tests pass one to exercise each fallback).
    """

    def __init__(self, path: str, alignment_sources: tuple[str, ...] = ALIGNMENT_SOURCES):
        unknown = set(alignment_sources) - set(ALIGNMENT_SOURCES)
        if unknown or not alignment_sources:
            raise ValueError(f"alignment_sources must be a non-empty subset of {ALIGNMENT_SOURCES}, got {alignment_sources}")
        self.path = path
        self.size_bytes = os.stat(path).st_size
        self.fallback_reason: str | None = None
        self.alignment = DirectIoAlignment(mmap.PAGESIZE, mmap.PAGESIZE, "page")
        self._fd = -1
        self._fd = self._open_direct_or_fallback(alignment_sources)
        self.direct = self.fallback_reason is None

    @property
    def alignment_bytes(self) -> int:
        return self.alignment.offset_bytes

    @property
    def memory_alignment_bytes(self) -> int:
        return self.alignment.memory_bytes

    def _open_direct_or_fallback(self, alignment_sources: tuple[str, ...]) -> int:
        fs_type = filesystem_type(self.path)
        if fs_type in MEMORY_FILESYSTEMS:
            return self._open_buffered(f"{self.path} is on {fs_type}, a memory filesystem: no device to read directly")
        told = statx_dio_alignment(self.path) if "statx" in alignment_sources else None
        if told is not None and told.offset_bytes == 0:
            return self._open_buffered(f"the filesystem of {self.path} ({fs_type}) reports no direct I/O for it (statx)")
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            return self._open_buffered(f"the filesystem of {self.path} ({fs_type}) refuses O_DIRECT at open ({exc})")
        try:
            alignment = told or self._alignment_without_statx(fd, alignment_sources)
        except BaseException:
            os.close(fd)
            raise
        if alignment is None:
            os.close(fd)
            return self._open_buffered(f"the filesystem of {self.path} ({fs_type}) refuses O_DIRECT reads "
                                       f"at every alignment up to {PROBE_ALIGNMENTS_BYTES[-1]} bytes")
        # Some filesystems accept the flag at open and refuse the first read.
        probe = aligned_buffer(max(alignment.offset_bytes, alignment.memory_bytes))
        try:
            os.preadv(fd, [memoryview(probe)[: alignment.offset_bytes]], 0)
        except OSError as exc:
            os.close(fd)
            if exc.errno != errno.EINVAL:
                raise
            return self._open_buffered(f"the filesystem of {self.path} ({fs_type}) refuses O_DIRECT reads ({exc})")
        self.alignment = alignment
        return fd

    def _alignment_without_statx(self, fd: int, alignment_sources: tuple[str, ...]) -> DirectIoAlignment | None:
        """The block device's logical block size, else a probe: for offsets, lengths and addresses alike."""
        if "block_device" in alignment_sources:
            block_bytes = logical_block_size_bytes(self.path)
            if block_bytes:
                return DirectIoAlignment(block_bytes, block_bytes, "block_device")
        if "probe" in alignment_sources:
            probed_bytes = probe_direct_alignment_bytes(fd, self.size_bytes)
            return None if probed_bytes is None else DirectIoAlignment(probed_bytes, probed_bytes, "probe")
        # nothing left to ask: assume the page, which nearly every device accepts
        return DirectIoAlignment(mmap.PAGESIZE, mmap.PAGESIZE, "assumed")

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

        Offset and buffer length must be multiples of `alignment_bytes`, the buffer's address of
        `memory_alignment_bytes`.
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
        if length_bytes and np.frombuffer(view, np.uint8).ctypes.data % self.memory_alignment_bytes:
            raise ValueError(f"direct read into a buffer not aligned to {self.memory_alignment_bytes} bytes; "
                             "read into direct_io.aligned_buffer memory")
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
