"""Tell systemd how the daemon is doing: sd_notify(3) without libsystemd.

Under `Type=notify` systemd waits for READY=1 before it calls the unit
started, and with `WatchdogSec=` it restarts the unit when WATCHDOG=1 stops
arriving. The protocol is one AF_UNIX datagram per message, newline-separated
`KEY=value` lines, sent to the socket named in $NOTIFY_SOCKET: a filesystem
path, or an abstract-namespace name written with a leading '@'.

Outside systemd (a developer's shell, tests) $NOTIFY_SOCKET is unset and every
call is a no-op, so the server calls these methods unconditionally.

With `NotifyAccess=main` systemd accepts messages only from the main PID (it
reads the sender's credentials from the kernel), so the supervisor, not a
worker, must send them.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, MutableMapping

log = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
# The daemon notifies from its event loop. A manager that stops reading fills its datagram queue
# (/proc/sys/net/unix/max_dgram_qlen, often 10), after which a blocking send would stall every
# client; a send waits at most this long, then the message is dropped with a warning.
NOTIFY_SEND_TIMEOUT_S = 0.5
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"


class SystemdNotifier:
    """Sends sd_notify messages to the service manager, or nothing when there is none.

    notify_socket: the address to send to; None reads $NOTIFY_SOCKET.
    environ: where $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID are read
        (os.environ unless a caller passes its own mapping).
    unset_environment: remove those variables from environ once read, as
        sd_notify(3) offers, so worker processes spawned later do not inherit
        them and try to notify (with NotifyAccess=main systemd would log and
        drop every such message).
    """

    def __init__(
        self,
        notify_socket: str | None = None,
        environ: MutableMapping[str, str] | None = None,
        unset_environment: bool = False,
    ):
        environ = os.environ if environ is None else environ
        address_text = environ.get(NOTIFY_SOCKET_ENV) if notify_socket is None else notify_socket
        self._address = _parse_notify_address(address_text)
        self._watchdog_interval_s = _watchdog_interval_s(
            environ.get(WATCHDOG_USEC_ENV), environ.get(WATCHDOG_PID_ENV)
        )
        self._dropped = 0  # messages dropped since the manager's queue last took one
        if unset_environment:
            for name in (NOTIFY_SOCKET_ENV, WATCHDOG_USEC_ENV, WATCHDOG_PID_ENV):
                environ.pop(name, None)

    @property
    def enabled(self) -> bool:
        """True when a service manager listens, i.e. messages are really sent."""
        return self._address is not None

    def notify(self, wait_s: float = NOTIFY_SEND_TIMEOUT_S, **fields: object) -> bool:
        """Sends one datagram of KEY=value lines; returns False when disabled or dropped.

        Keys are upper-cased (`notify(status="x")` sends STATUS=x); booleans
        become 1/0. Raises OSError when the manager's socket cannot be reached,
        since a lost READY=1 would otherwise surface only as a start timeout.
        When the manager's queue stays full for wait_s the message is dropped
        (logged), so a manager that stops reading never stalls the daemon.
        """
        if not fields:
            raise ValueError("notify() needs at least one field, e.g. notify(READY=1)")
        lines = []
        for key, value in fields.items():
            text = str(int(value)) if isinstance(value, bool) else str(value)
            if "\n" in text:
                # A newline would start a new KEY=value line and forge another field.
                raise ValueError(f"sd_notify field {key.upper()} must be one line, got {text!r}")
            lines.append(f"{key.upper()}={text}")
        if self._address is None:
            return False
        payload = "\n".join(lines).encode("utf-8")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(wait_s)
            try:
                sock.sendto(payload, self._address)
            except (BlockingIOError, TimeoutError):
                if not self._dropped:  # once per stall, not every 0.2 s ping
                    log.warning("the service manager is not reading its notification socket; dropping "
                                "messages until it does (first: %s)",
                                ", ".join(line.split("=", 1)[0] for line in lines))
                self._dropped += 1
                return False
        if self._dropped:
            log.warning("the service manager reads its notification socket again; %d messages were dropped",
                        self._dropped)
            self._dropped = 0
        return True

    def ready(self) -> bool:
        """Start-up is complete: every worker is up and the endpoint is bound."""
        return self.notify(READY=1)

    def status(self, text: str) -> bool:
        """A one-line human status shown by `systemctl status` (newlines become spaces)."""
        return self.notify(STATUS=" ".join(text.splitlines()))

    def stopping(self) -> bool:
        """Shutdown has begun (draining requests), so systemd shows 'deactivating'."""
        return self.notify(STOPPING=1)

    def watchdog(self) -> bool:
        """Keep-alive ping; systemd restarts the unit when pings stop for WatchdogSec."""
        # a ping that cannot go at once is dropped: the next one follows within the interval
        return self.notify(wait_s=0.0, WATCHDOG=1)

    def watchdog_interval_s(self) -> float | None:
        """How often to ping: half of $WATCHDOG_USEC, None when no watchdog applies to this process."""
        return self._watchdog_interval_s


async def watchdog_loop(
    notifier: SystemdNotifier,
    interval_s: float | None,
    is_healthy: Callable[[], bool],
) -> None:
    """Pings the watchdog every interval_s while is_healthy() holds; runs until cancelled.

    An unhealthy check (or one that raises) skips the ping on purpose: if the
    daemon stays unhealthy for WatchdogSec, systemd kills and restarts it,
    which is the recovery we want for a wedged worker. is_healthy runs on the
    event loop, so it must answer from state at hand (e.g. "every worker's
    last heartbeat is recent"), never block; a blocked event loop stops the
    pings as well, which is also right. Returns at once when there is no
    watchdog (interval_s is None or the notifier is disabled).
    """
    if interval_s is None or not notifier.enabled:
        return
    if interval_s <= 0:
        raise ValueError(f"watchdog interval must be positive, got {interval_s} s")
    was_healthy = True
    while True:
        try:
            healthy = bool(is_healthy())
        except Exception:
            log.exception("watchdog health check raised; treating the daemon as unhealthy")
            healthy = False
        if healthy:
            try:
                notifier.watchdog()
            except OSError as error:
                # Keep trying: a missed ping costs nothing until WatchdogSec runs out.
                log.warning("could not send WATCHDOG=1 to systemd: %s", error)
        elif was_healthy:
            log.error("daemon unhealthy: withholding watchdog pings, systemd will restart it")
        was_healthy = healthy
        await asyncio.sleep(interval_s)


def _parse_notify_address(address_text: str | None) -> str | bytes | None:
    """$NOTIFY_SOCKET → an address for sendto(); None when there is no manager to notify."""
    if not address_text:
        return None
    if address_text.startswith("/"):
        return address_text
    if address_text.startswith("@"):
        # Abstract namespace: the name starts with a NUL byte instead of '@'.
        return b"\0" + address_text[1:].encode("utf-8")
    # Newer systemd can hand out vsock: addresses (to VMs); not a case for a
    # local daemon, and failing start-up over it would be worse than no notify.
    log.warning(
        "%s=%r is neither a path nor an @abstract socket; systemd notifications are disabled",
        NOTIFY_SOCKET_ENV, address_text,
    )
    return None


def _watchdog_interval_s(usec_text: str | None, watchdog_pid_text: str | None) -> float | None:
    """Half the WatchdogSec systemd set, as sd_watchdog_enabled(3) recommends.

    Half leaves a whole interval of slack for a slow event loop. $WATCHDOG_PID,
    when set, names the one process the watchdog is meant for: a child that
    inherited the environment must not ping on its parent's behalf.
    """
    if not usec_text:
        return None
    if watchdog_pid_text and _parse_positive_int(WATCHDOG_PID_ENV, watchdog_pid_text) != os.getpid():
        return None
    return _parse_positive_int(WATCHDOG_USEC_ENV, usec_text) / 1e6 / 2


def _parse_positive_int(name: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"${name} must be a positive integer, got {text!r}")
    return value
