"""systemd's service protocol, spoken directly: no python-systemd, no libsystemd.

- `Notifier` sends sd_notify(3) datagrams (`READY=1`, `STATUS=...`, `WATCHDOG=1`,
  `STOPPING=1`, `RELOADING=1`) to `$NOTIFY_SOCKET`: a unix datagram socket given as a
  path, or as `@name` for Linux's abstract namespace.
- `watchdog_interval` reads `$WATCHDOG_USEC` (and `$WATCHDOG_PID`): how often to ping.
- `Watchdog` pings at that interval only while a health check finds nothing wrong, so
  a stalled agent stops pinging and systemd restarts it (`WatchdogSec=`, `Restart=`).

Outside systemd (no `$NOTIFY_SOCKET`) every call is a cheap no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"


def _socket_address(value: str) -> str | bytes | None:
    """`$NOTIFY_SOCKET` as a `sendto` address; None when it is a kind we do not speak."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()  # Linux abstract namespace: a leading NUL byte
    return None  # e.g. systemd 253's "vsock:CID:PORT", for VMs; not a gateway's case


def one_line(text: str) -> str:
    """A notify value: the protocol separates assignments by newlines."""
    return " ".join(text.split())


class Notifier:
    """Sends notifications to the service manager; thread-safe; never raises."""

    def __init__(self, notify_socket: str | None) -> None:
        self.socket_name = notify_socket or None
        self._address = _socket_address(notify_socket) if notify_socket else None
        if notify_socket and self._address is None:
            log.warning("%s=%r is not a unix socket path or @name; not notifying systemd",
                        NOTIFY_SOCKET_ENV, notify_socket)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._failed_once = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(env.get(NOTIFY_SOCKET_ENV))

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send `KEY=VALUE` lines in one datagram; True when the manager got it."""
        if self._address is None:
            return False
        data = "\n".join(assignments).encode()
        with self._lock:
            try:
                if self._sock is None:
                    # Python sockets are close-on-exec already: no child inherits it.
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.sendto(data, self._address)
            except OSError as exc:
                # The manager may be restarting (daemon-reexec); tell once, then quietly retry.
                level = logging.DEBUG if self._failed_once else logging.WARNING
                log.log(level, "sd_notify to %s failed: %s", self.socket_name, exc)
                self._failed_once = True
                return False
        return True

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={one_line(text)}")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def watchdog_interval(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between `WATCHDOG=1` pings: half of `$WATCHDOG_USEC`, as sd_watchdog_enabled(3)
    advises; None when no watchdog is asked of this process."""
    env = os.environ if environ is None else environ
    raw = env.get(WATCHDOG_USEC_ENV)
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("%s=%r is not a number of microseconds; no watchdog", WATCHDOG_USEC_ENV, raw)
        return None
    if usec <= 0:
        return None
    owner = env.get(WATCHDOG_PID_ENV)
    if owner:
        # The watchdog belongs to another process (e.g. a wrapper that exec'd us is not us).
        try:
            if int(owner) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 2_000_000.0


HealthCheck = Callable[[], str | None]  # None when healthy, else what is wrong


class Watchdog:
    """Pings `WATCHDOG=1` every `interval` seconds while `check()` returns None.

    When `check()` names a problem the pings stop (the problem is logged once and put in
    `STATUS=`); systemd then kills and restarts the service when `WatchdogSec=` passes
    without a ping. Pings resume if the problem clears first.
    """

    def __init__(self, notifier: Notifier, interval: float, check: HealthCheck,
                 healthy_status: Callable[[], str] | None = None) -> None:
        self._notifier = notifier
        self._interval = interval
        self._check = check
        self._healthy_status = healthy_status
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.problem: str | None = None
        self.pings = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def beat(self) -> None:
        """One round: check, then ping or withhold."""
        try:
            problem = self._check()
        except Exception as exc:  # a broken check must not pass for health
            log.exception("watchdog health check failed")
            problem = f"health check failed: {exc}"
        if problem is None:
            if self.problem is not None:
                log.warning("watchdog: healthy again, WATCHDOG=1 resumes (was: %s)", self.problem)
                self.problem = None
                if self._healthy_status is not None:
                    self._notifier.status(self._healthy_status())
            self._notifier.notify("WATCHDOG=1")
            self.pings += 1
            return
        if problem != self.problem:
            log.error("watchdog: withholding WATCHDOG=1, systemd restarts the agent unless "
                      "this clears: %s", problem)
            self._notifier.status(f"unhealthy: {problem}")
        self.problem = problem

    def _run(self) -> None:
        next_at = time.monotonic()
        while True:
            self.beat()
            next_at += self._interval
            if self._stop.wait(max(0.0, next_at - time.monotonic())):
                return
