"""Where a runtime instance's worker sockets live: one private directory per instance.

    $FLASHLLM_RUNTIME_DIR | $RUNTIME_DIRECTORY (systemd) | $XDG_RUNTIME_DIR/flashllm | /tmp/flashllm-<uid>
                                    (the root: owned by this uid, mode 0700 or 0750, not a symlink)
      <pid>-<hex>/                  one supervisor instance (mkdir'ed exclusively)
        supervisor.lock             flock held for the supervisor's lifetime; holds its pid
        supervisor.sock             ipc inboxes, one PULL socket per process
        compute.sock  predictor.sock  prefetch.sock

A fresh directory per instance means no two processes ever bind the same ipc
path (ZeroMQ would silently steal it, zmq_ipc(7)). The lock tells a later
supervisor whether an instance is alive: the kernel releases a flock when its
holder dies, so a stale instance (SIGKILL) is one whose lock can be taken; its
directory and its /dev/shm segments (protocol/shm.py) are then swept.

Whoever can write the root can bind an instance's sockets and read every
prompt's token ids, so the root is made with mkdir (never through a symlink)
and, when it exists already, used only if this uid owns it and nobody else
may write it or (0750 at most) enter it; anything else is refused with
RuntimeDirError saying what to do.

Pure Python.
"""
from __future__ import annotations

import errno
import fcntl
import os
import secrets
import shutil

IPC_SCHEME = "ipc://"
MAX_IPC_PATH_BYTES = 107  # sockaddr_un.sun_path is 108 bytes with the trailing NUL
LOCK_FILE = "supervisor.lock"


class RuntimeDirError(PermissionError):
    """The runtime root is not private to this user (another owner, loose mode, a symlink)."""


class EndpointPathTooLong(ValueError):
    """An ipc socket path does not fit sockaddr_un."""


def new_instance_id() -> str:
    """'<pid>-<hex>': the pid lets a sweeper judge liveness even without the lock file."""
    return f"{os.getpid()}-{secrets.token_hex(3)}"


def runtime_root() -> str:
    explicit = os.environ.get("FLASHLLM_RUNTIME_DIR")
    if explicit:
        return explicit
    systemd = os.environ.get("RUNTIME_DIRECTORY")  # the unit's RuntimeDirectory=, made by systemd for this user
    if systemd:
        return systemd.split(":")[0]
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return os.path.join(xdg, "flashllm")
    return f"/tmp/flashllm-{os.getuid()}"


PRIVATE_MODE_MASK = 0o027  # no write for the group, nothing for others: 0700 and 0750 pass


def private_runtime_root(root: str | None = None) -> str:
    """The runtime root, created 0700 if missing; RuntimeDirError unless it is a directory this uid owns
    that no one else may write (not a symlink). Returns its path."""
    root = root or runtime_root()
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        raise RuntimeDirError(f"cannot create the runtime directory {root}: its parent does not exist; create it "
                              "or set FLASHLLM_RUNTIME_DIR to a directory of yours") from None
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            raise RuntimeDirError(f"the runtime directory {root} is a symlink or not a directory: refusing to put "
                                  "worker sockets there; remove it, or set FLASHLLM_RUNTIME_DIR (or "
                                  "XDG_RUNTIME_DIR) to a private directory") from None
        raise
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    if info.st_uid != os.getuid():
        raise RuntimeDirError(
            f"the runtime directory {root} belongs to uid {info.st_uid}, not to this user (uid {os.getuid()}): "
            "someone else could read the requests through it; remove it (it may be an attack), or set "
            "FLASHLLM_RUNTIME_DIR (or XDG_RUNTIME_DIR) to a private directory")
    if info.st_mode & PRIVATE_MODE_MASK:
        raise RuntimeDirError(
            f"the runtime directory {root} has mode {info.st_mode & 0o777:#o}; it must not be writable by its group "
            f"nor open to others: chmod 700 {root}, or set FLASHLLM_RUNTIME_DIR to a private directory")
    return root


def instance_dir(instance: str, root: str | None = None) -> str:
    return os.path.join(root or runtime_root(), instance)


def endpoint(directory: str, role: str) -> str:
    """ipc://<directory>/<role>.sock, checked against the sockaddr_un limit."""
    path = os.path.join(directory, f"{role}.sock")
    if len(os.fsencode(path)) > MAX_IPC_PATH_BYTES:
        raise EndpointPathTooLong(
            f"ipc socket path {path!r} is {len(os.fsencode(path))} bytes; the limit is {MAX_IPC_PATH_BYTES}. "
            "Set FLASHLLM_RUNTIME_DIR to a shorter directory (e.g. /tmp/fl)")
    return IPC_SCHEME + path


class InstanceDir:
    """The private directory of one live instance, locked for as long as this object is open."""

    def __init__(self, instance: str, root: str | None = None):
        self.instance = instance
        self.root = root or runtime_root()
        self.path = instance_dir(instance, self.root)
        self._lock_fd = -1

    def create(self) -> "InstanceDir":
        private_runtime_root(self.root)
        os.mkdir(self.path, 0o700)  # FileExistsError: the id is taken (ids are random: should not happen)
        endpoint(self.path, "supervisor")  # refuse a too-long root before any worker starts
        fd = os.open(os.path.join(self.path, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        return self

    def endpoint(self, role: str) -> str:
        return endpoint(self.path, role)

    def remove(self) -> None:
        """Delete the directory (sockets, lock) and release the lock; safe to call twice."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def instance_alive(instance: str, root: str | None = None) -> bool:
    """Is the supervisor of `instance` still running? Its lock decides; without one, its pid."""
    lock_path = os.path.join(instance_dir(instance, root), LOCK_FILE)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        try:
            return pid_alive(int(instance.split("-", 1)[0]))
        except ValueError:
            return True  # not a name we made: leave it alone
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    finally:
        os.close(fd)  # closing drops the lock we may have taken
    return False


def stale_instance_dirs(root: str | None = None) -> list[str]:
    """Instance ids under the runtime root whose supervisor is gone."""
    root = root or runtime_root()
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    return [name for name in names if os.path.isdir(os.path.join(root, name)) and not instance_alive(name, root)]
