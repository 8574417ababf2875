"""Linux native AIO: many direct reads in flight from one thread, without a thread per read.

Why: flash serves small random reads fast only at a deep queue. A pool of
threads each blocked in `preadv` keeps at most one read per thread in flight,
and on a machine of few cores each completion costs a thread wake-up and a
turn at the GIL; one `io_submit` puts a whole round of reads on the queue with
almost no CPU (docs/benchmarks.md, "Figures moved out of the code", has the
reads/s of both).

How: the kernel ABI is four syscalls (io_setup, io_submit, io_getevents,
io_destroy) and two fixed-layout structs, called through ctypes (which
releases the GIL for the call). The structs are numpy structured arrays, so a
batch of requests is written into its iocbs with a few vectorized stores.

Why not a library: python-libaio wraps the system libaio.so.1, which many
machines (this one included) do not have; caio reads only into buffers it
allocates itself, which O_DIRECT refuses (not block aligned) and which would
cost a copy. io_uring would do as well but needs far more ABI.

Linux native AIO is asynchronous only for O_DIRECT reads; on a buffered file
io_submit does the read itself. So callers use it for direct files only.
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform
from typing import Callable

import numpy as np

DEFAULT_QUEUE_DEPTH = 128  # reads in flight: past ~64 this device gains nothing, and a round rarely has more

# io_setup, io_destroy, io_submit, io_getevents
_SYSCALL_NUMBERS = {"x86_64": (206, 207, 209, 208), "aarch64": (0, 1, 2, 4)}
_IOCB_CMD_PREAD = 0

# struct iocb and struct io_event of <linux/aio_abi.h>, little-endian 64-bit layout
IOCB_DTYPE = np.dtype([
    ("data", "<u8"), ("key", "<u4"), ("rw_flags", "<i4"), ("opcode", "<u2"), ("reqprio", "<i2"), ("fildes", "<u4"),
    ("buf", "<u8"), ("nbytes", "<u8"), ("offset", "<i8"), ("reserved2", "<u8"), ("flags", "<u4"), ("resfd", "<u4"),
])
IO_EVENT_DTYPE = np.dtype([("data", "<u8"), ("obj", "<u8"), ("res", "<i8"), ("res2", "<i8")])
assert IOCB_DTYPE.itemsize == 64 and IO_EVENT_DTYPE.itemsize == 32


class AioUnavailable(OSError):
    """This kernel, architecture or sandbox gives no AIO context; use threads instead."""


def _syscall_function():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc.syscall


class AioQueue:
    """One kernel AIO context of `depth` slots. Not thread-safe: one caller at a time."""

    def __init__(self, depth: int = DEFAULT_QUEUE_DEPTH):
        if depth < 1:
            raise ValueError(f"AIO queue depth must be >= 1, got {depth}")
        numbers = _SYSCALL_NUMBERS.get(platform.machine())
        if numbers is None or not hasattr(os, "O_DIRECT"):
            raise AioUnavailable(errno.ENOSYS, f"no Linux AIO on {platform.system()} {platform.machine()}")
        self._setup_nr, self._destroy_nr, self._submit_nr, self._getevents_nr = numbers
        self._syscall = _syscall_function()
        self._context = ctypes.c_ulong(0)
        if self._syscall(ctypes.c_long(self._setup_nr), ctypes.c_long(depth), ctypes.byref(self._context)) < 0:
            code = ctypes.get_errno()
            self._context = None
            raise AioUnavailable(code, f"io_setup({depth}) failed: {os.strerror(code)} "
                                       "(a sandbox that forbids AIO, or /proc/sys/fs/aio-max-nr reached)")
        self.depth = depth
        self._iocbs = np.zeros(depth, IOCB_DTYPE)  # (depth,) one per slot, reused once its read completed
        self._iocbs["opcode"] = _IOCB_CMD_PREAD
        self._iocb_addresses = (self._iocbs.ctypes.data
                                + IOCB_DTYPE.itemsize * np.arange(depth, dtype=np.uint64))  # (depth,)
        self._submit_list = np.zeros(depth, dtype=np.uint64)  # (depth,) iocb pointers handed to one io_submit
        self._events = np.zeros(depth, IO_EVENT_DTYPE)  # (depth,)

    @property
    def closed(self) -> bool:
        return self._context is None

    def read_all(self, fd: int, offsets: np.ndarray, lengths: np.ndarray, addresses: np.ndarray,
                 on_complete: Callable[[int, int], None]) -> None:
        """Read lengths[i] bytes at offsets[i] of `fd` into memory at addresses[i], for every i.

        Keeps up to `depth` reads in flight; on_complete(i, bytes_read) runs on
        this thread as read i finishes (a short count means end of file). The
        memory must stay valid until this returns. The first error (a failed
        read, or one raised by on_complete) is raised only after every
        submitted read has finished: nothing writes into the buffers after return.
        """
        for _ in self.reads(fd, offsets, lengths, addresses, on_complete):
            pass

    def reads(self, fd: int, offsets: np.ndarray, lengths: np.ndarray, addresses: np.ndarray,
              on_complete: Callable[[int, int], None]):
        """read_all as a generator that yields once, right after the first reads went to the device.

        The caller works while the device reads; exhausting the generator finishes
        every read (on_complete runs then, on the caller's thread). Closing it early
        waits for the reads in flight and drops the rest. One at a time per queue.
        """
        if self.closed:
            raise ValueError("AioQueue is closed")
        offsets = np.asarray(offsets, dtype=np.int64)  # (n,)
        lengths = np.asarray(lengths, dtype=np.uint64)  # (n,)
        addresses = np.asarray(addresses, dtype=np.uint64)  # (n,)
        num_reads = len(offsets)
        free_slots = list(range(self.depth))
        next_read = in_flight = 0
        first_error: BaseException | None = None
        finished: list[tuple[int, int]] = []  # (read, result) reaped but not yet handed to on_complete
        yielded = False
        self._iocbs["fildes"] = fd
        while in_flight or finished or (next_read < num_reads and first_error is None):
            if next_read < num_reads and first_error is None and free_slots:
                count = min(len(free_slots), num_reads - next_read)
                slots = np.array(free_slots[-count:], dtype=np.int64)  # (count,)
                del free_slots[-count:]
                reads = np.arange(next_read, next_read + count)  # (count,)
                self._iocbs["data"][slots] = reads
                self._iocbs["buf"][slots] = addresses[reads]
                self._iocbs["nbytes"][slots] = lengths[reads]
                self._iocbs["offset"][slots] = offsets[reads]
                self._submit_list[:count] = self._iocb_addresses[slots]
                try:
                    submitted = self._submit(count, in_flight)
                except OSError as exc:
                    submitted, first_error = 0, exc
                free_slots.extend(slots[submitted:].tolist())  # not taken by the kernel: free again
                next_read += submitted
                in_flight += submitted
            if not yielded:
                yielded = True
                try:
                    yield
                except GeneratorExit:
                    self._drain(in_flight)  # nothing may write into the caller's buffers once it moved on
                    raise
            # Callbacks only after the freed slots were refilled: the device works while they copy.
            for read, result in finished:
                if first_error is not None:
                    break
                if result < 0:
                    first_error = OSError(-result, f"direct read of {int(lengths[read])} bytes at offset "
                                                   f"{int(offsets[read])} failed: {os.strerror(-result)}")
                    break
                try:
                    on_complete(read, result)
                except BaseException as exc:  # noqa: BLE001 - re-raised below, once no read is in flight
                    first_error = exc
            finished = []
            if in_flight:
                done = self._get_events(in_flight)  # raises with reads still in flight: the context is unusable
                events = self._events[:done]
                free_slots.extend(((events["obj"] - self._iocb_addresses[0]) // IOCB_DTYPE.itemsize).tolist())
                in_flight -= done
                finished = list(zip(events["data"].tolist(), events["res"].tolist()))
        if not yielded:
            yield  # nothing to read
        if first_error is not None:
            raise first_error

    def _get_events(self, in_flight: int) -> int:
        """Block until at least one of `in_flight` reads completes; their events land in self._events."""
        while True:
            done = self._syscall(ctypes.c_long(self._getevents_nr), self._context, ctypes.c_long(1),
                                 ctypes.c_long(in_flight), ctypes.c_void_p(self._events.ctypes.data), None)
            if done >= 0:
                return done
            code = ctypes.get_errno()
            if code != errno.EINTR:
                raise OSError(code, f"io_getevents failed: {os.strerror(code)}")

    def _drain(self, in_flight: int) -> None:
        """Wait until `in_flight` submitted reads have completed, dropping their results."""
        while in_flight:
            in_flight -= self._get_events(in_flight)

    def _submit(self, count: int, in_flight: int) -> int:
        """io_submit the first `count` iocbs of the submit list; how many the kernel took (0: retry later)."""
        while True:
            taken = self._syscall(ctypes.c_long(self._submit_nr), self._context, ctypes.c_long(count),
                                  ctypes.c_void_p(self._submit_list.ctypes.data))
            if taken >= 0:
                return taken
            code = ctypes.get_errno()
            if code == errno.EINTR:
                continue
            if code == errno.EAGAIN and in_flight:
                return 0  # out of kernel resources for now: reap completions, then submit again
            raise OSError(code, f"io_submit of {count} reads failed: {os.strerror(code)}")

    def close(self) -> None:
        """Destroy the context; the kernel waits for reads still in flight. Safe to call twice."""
        if self._context is not None:
            self._syscall(ctypes.c_long(self._destroy_nr), self._context)
            self._context = None

    def __enter__(self) -> "AioQueue":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
