"""One server per ipc:// endpoint: a lock file beside the socket, taken before bind.

Binding an ipc:// path that another process already serves does not fail in
ZeroMQ: libzmq unlinks the old socket file and binds a new one, silently
stealing every future client from the first server (zmq_ipc(7)). So before
binding, the server takes an exclusive flock on SOCKET.lock:

    /run/flashllm/flashllm.sock        the ipc socket (bound by ZeroMQ)
    /run/flashllm/flashllm.sock.lock   flock held for the server's lifetime,
                                       contents: the holder's pid + newline

flock is released by the kernel when the holder dies, so a crashed server
never blocks the next one; the socket file it left behind is removed only
while holding the lock. The lock belongs to the open file description, so a
second IpcEndpointLock in the same process also refuses.
"""
from __future__ import annotations

import errno
import fcntl
import grp
import os
import socket
import stat

IPC_SCHEME = "ipc://"
LOCK_SUFFIX = ".lock"
# sockaddr_un.sun_path is 108 bytes on Linux and needs a trailing NUL.
MAX_SOCKET_PATH_BYTES = 107


class IpcEndpointError(RuntimeError):
    """The ipc endpoint cannot be used as asked: bad path, missing directory, bad permissions."""


class EndpointInUseError(IpcEndpointError):
    """Another server holds the endpoint's lock or is listening on its socket."""


class IpcEndpointLock:
    """Exclusive ownership of one ipc socket path, for one server's lifetime.

        with IpcEndpointLock("/run/flashllm/flashllm.sock") as lock:
            sock.bind(lock.endpoint)
            apply_socket_permissions(lock.socket_path, group="flashllm")
            ...   # serve; on exit the socket and lock files are removed

    socket_path: a filesystem path, with or without the ipc:// prefix;
        relative paths are made absolute so the lock and bind agree.
    """

    def __init__(self, socket_path: str):
        self._lock_fd: int | None = None
        self.socket_path = _validated_socket_path(socket_path)
        self.lock_path = self.socket_path + LOCK_SUFFIX

    @property
    def endpoint(self) -> str:
        """The ZeroMQ address to bind once the lock is held."""
        return IPC_SCHEME + self.socket_path

    @property
    def held(self) -> bool:
        return self._lock_fd is not None

    def acquire(self) -> None:
        """Takes the lock or raises EndpointInUseError naming the holder; a no-op if held."""
        if self._lock_fd is not None:
            return
        directory = os.path.dirname(self.socket_path)
        if not os.path.isdir(directory):
            raise IpcEndpointError(
                f"socket directory {directory} does not exist: create it (the systemd unit's "
                f"RuntimeDirectory=flashllm makes /run/flashllm) or pass --socket in an existing directory"
            )
        lock_fd = self._open_and_lock()
        try:
            _write_pid(lock_fd)
            self._remove_stale_socket_file()
        except BaseException:
            # Whatever is at the socket path is not ours: leave it, drop only the lock.
            os.unlink(self.lock_path)
            os.close(lock_fd)
            raise
        self._lock_fd = lock_fd

    def release(self) -> None:
        """Removes the socket file and the lock file, then drops the lock; idempotent.

        Call it after the ZeroMQ socket is closed (libzmq may already have
        removed the socket file, which is fine).
        """
        if self._lock_fd is None:
            return
        # Unlink while still holding the lock so a starting server never sees
        # our half-removed files as its own.
        for path in (self.socket_path, self.lock_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        os.close(self._lock_fd)
        self._lock_fd = None

    def __enter__(self) -> IpcEndpointLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def __del__(self) -> None:
        # Only closes the descriptor; deleting files from a finalizer could
        # race a successor, so release() is the way to clean up.
        if self._lock_fd is not None:
            os.close(self._lock_fd)

    def _open_and_lock(self) -> int:
        """Opens SOCKET.lock and flocks it, retrying if a releasing holder unlinked it meanwhile."""
        while True:
            try:
                # O_NOFOLLOW: a symlink planted at the lock path must not make us write its target (as root)
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as error:
                if error.errno == errno.ELOOP:
                    raise IpcEndpointError(
                        f"{self.lock_path} is a symlink: refusing to follow it (it could point at any file); "
                        f"remove it or pass --socket in a directory only the server's user can write") from None
                if not isinstance(error, PermissionError):
                    raise
                raise IpcEndpointError(
                    f"cannot create {self.lock_path}: permission denied; run as the user that owns "
                    f"{os.path.dirname(self.lock_path)} (the service runs as flashllm) "
                    f"or pass --socket in a directory you can write"
                ) from None
            try:
                _check_own_regular_file(fd, self.lock_path)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder_pid = _read_pid(fd)
                os.close(fd)
                holder = f"pid {holder_pid}" if holder_pid is not None else "pid unknown"
                raise EndpointInUseError(
                    f"another flashllm serve ({holder}) is already serving {self.socket_path}: "
                    f"stop it first (systemctl stop flashllm, or kill {holder_pid or 'it'}) "
                    f"or pass a different --socket"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            # The previous holder unlinks the lock file in release(); if that
            # happened between our open and flock, we locked an orphaned inode
            # that a third server could lock too under a fresh file. Retry.
            try:
                on_disk = os.stat(self.lock_path)
            except FileNotFoundError:
                on_disk = None
            locked = os.fstat(fd)
            if on_disk is not None and (on_disk.st_dev, on_disk.st_ino) == (locked.st_dev, locked.st_ino):
                return fd
            os.close(fd)

    def _remove_stale_socket_file(self) -> None:
        """Deletes a socket file left by a dead server; refuses anything else at the path."""
        try:
            mode = os.lstat(self.socket_path).st_mode
        except FileNotFoundError:
            return
        if stat.S_ISLNK(mode):
            raise IpcEndpointError(
                f"{self.socket_path} is a symlink: refusing to follow or replace it; "
                f"remove it or pass --socket in a directory only the server's user can write"
            )
        if not stat.S_ISSOCK(mode):
            raise IpcEndpointError(
                f"{self.socket_path} exists and is not a socket: refusing to replace it; "
                f"remove it or pass a different --socket"
            )
        if _is_listening(self.socket_path):
            # Someone serves here without our lock (another program, or a
            # server started by hand with an old build): binding would steal it.
            raise EndpointInUseError(
                f"a process is listening on {self.socket_path} but holds no {LOCK_SUFFIX} file: "
                f"stop it (see `ss -xlp | grep {os.path.basename(self.socket_path)}`) "
                f"or pass a different --socket"
            )
        os.unlink(self.socket_path)


def apply_socket_permissions(socket_path: str, mode: int = 0o660, group: str | None = None) -> None:
    """Sets who may connect, after bind: connecting needs write permission on the socket file.

    mode: permission bits for the socket file (0o660: owner and group).
    group: a group name whose members may connect (e.g. "flashllm"); None keeps the group.
    """
    socket_path = socket_path.removeprefix(IPC_SCHEME)
    gid = -1
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise IpcEndpointError(
                f"socket group {group!r} does not exist: create it (systemd-sysusers "
                f"deploy/flashllm.sysusers, or groupadd {group}) or drop --socket-group"
            ) from None
    try:
        info = os.lstat(socket_path)
        if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.getuid():
            # swapped for something else since bind: never chmod/chown what a link points at
            raise IpcEndpointError(f"{socket_path} is no longer the socket this server bound; refusing to change "
                                   "its permissions: pass --socket in a directory only the server's user can write")
        if gid != -1:
            os.chown(socket_path, -1, gid, follow_symlinks=False)
        os.chmod(socket_path, mode)
    except FileNotFoundError:
        raise IpcEndpointError(
            f"cannot set permissions on {socket_path}: it does not exist (bind the socket first)"
        ) from None
    except PermissionError as error:
        raise IpcEndpointError(
            f"cannot give {socket_path} group {group!r} and mode {mode:#o}: {error.strerror}; "
            f"the server's user must own the socket and belong to group {group!r}"
        ) from None


def _validated_socket_path(socket_path: str) -> str:
    path = socket_path.removeprefix(IPC_SCHEME)
    if not path:
        raise IpcEndpointError("socket path is empty: pass --socket PATH, e.g. /run/flashllm/flashllm.sock")
    if path.startswith("@"):
        raise IpcEndpointError(
            f"abstract socket {path!r} is not supported: it has no file permissions to restrict "
            f"who connects; pass a filesystem path such as /run/flashllm/flashllm.sock"
        )
    path = os.path.abspath(path)
    path_bytes = len(os.fsencode(path))
    if path_bytes > MAX_SOCKET_PATH_BYTES:
        raise IpcEndpointError(
            f"socket path is {path_bytes} bytes, longer than the {MAX_SOCKET_PATH_BYTES} bytes "
            f"a unix socket address (sun_path) can hold: {path}; choose a shorter path"
        )
    return path


def _check_own_regular_file(fd: int, path: str) -> None:
    """The opened lock must be a plain file of ours with one name: a hard link planted there is refused."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or info.st_uid != os.geteuid():
        raise IpcEndpointError(
            f"{path} is not a lock file this server made (owner uid {info.st_uid}, {info.st_nlink} links): "
            f"refusing to write it; remove it or pass --socket in a directory only the server's user can write")


def _write_pid(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _read_pid(fd: int) -> int | None:
    """The holder's pid from an open lock file; None if it has not written it yet."""
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except ValueError:
        return None


def _is_listening(socket_path: str) -> bool:
    """True when connecting succeeds, i.e. a live process has the socket bound and listening."""
    # ZeroMQ ipc:// endpoints are SOCK_STREAM unix sockets.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        try:
            probe.connect(socket_path)
        except OSError as error:
            if error.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return False
            if error.errno == errno.EPROTOTYPE:
                return True  # bound by a live process, as a datagram socket
            raise IpcEndpointError(
                f"cannot tell whether {socket_path} is still served: connect failed with "
                f"{error.strerror}; remove the file if no server uses it"
            ) from None
    return True
