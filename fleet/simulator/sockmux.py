"""Many paho clients on one network thread: a selector over their sockets and a timer heap.

paho's own `loop_start()` costs a thread per client; a thousand simulated devices would
need a thousand threads. Here every attached client's socket sits in one `selectors`
selector, kept in step with paho through its socket callbacks (`on_socket_open`,
`on_socket_close`, `on_socket_register_write`, `on_socket_unregister_write`), and the
thread calls paho's `loop_read`, `loop_write` and, once a second, `loop_misc` (keepalive,
retries). `after()` runs a function on that thread after a delay, so whatever a client's
owner does (publishing, timers) happens on the one thread that touches its client.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import selectors
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho

log = logging.getLogger(__name__)

_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
# How long a stopping thread waits for its clients' sockets to close.
_DRAIN_S = 5.0


class SocketMux:
    """`attach()` clients, `start()`, `stop()`. `on_stop` runs on the thread once it is told
    to stop, before it waits for the attached clients' sockets to close (say goodbye and
    disconnect there)."""

    def __init__(self, name: str, on_stop: Callable[[], None] = lambda: None) -> None:
        self.sel = selectors.DefaultSelector()
        self._clients: list[paho.Client] = []
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._stop = threading.Event()
        self._on_stop = on_stop
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def attach(self, client: paho.Client) -> None:
        """Route the client's socket through this thread (before it connects)."""
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        self._clients.append(client)

    # -- timers -----------------------------------------------------------------------

    def after(self, delay_s: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay_s, next(self._seq), fn))

    # -- socket callbacks (keep the selector in step with paho) -------------------------

    def _on_socket_open(self, client: paho.Client, _userdata: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(sock)
        self.sel.register(sock, _READ, client)

    def _on_socket_close(self, _client: paho.Client, _userdata: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(sock)

    def _on_register_write(self, client: paho.Client, _userdata: Any, sock: Any) -> None:
        try:
            self.sel.modify(sock, _READ | _WRITE, client)
        except KeyError:
            self.sel.register(sock, _READ | _WRITE, client)

    def _on_unregister_write(self, client: paho.Client, _userdata: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.modify(sock, _READ, client)

    # -- the loop -----------------------------------------------------------------------

    def start(self) -> None:
        self.after(1.0, self._misc)
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _misc(self) -> None:
        for client in self._clients:
            if client.socket() is not None:
                client.loop_misc()
        self.after(1.0, self._misc)

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _when, _seq, fn = heapq.heappop(self._timers)
            try:
                fn()
            except Exception:
                log.exception("simulated device timer failed")

    def _poll(self, timeout: float) -> None:
        for key, mask in self.sel.select(timeout):
            client: paho.Client = key.data
            if mask & _READ:
                client.loop_read()
                sock = client.socket()
                # TLS may hold decrypted bytes the selector cannot see.
                while sock is not None and getattr(sock, "pending", lambda: 0)():
                    client.loop_read()
                    sock = client.socket()
            if mask & _WRITE and client.socket() is not None:
                client.loop_write()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._run_timers()
                wait = 0.5
                if self._timers:
                    wait = min(wait, max(self._timers[0][0] - time.monotonic(), 0.0))
                self._poll(wait)
            self._on_stop()
            self._drain()
        except Exception:
            log.exception("simulator network thread failed")
        finally:
            self.sel.close()

    def _drain(self) -> None:
        """Poll until every attached client's socket has closed, for a few seconds at most."""
        deadline = time.monotonic() + _DRAIN_S
        while time.monotonic() < deadline and any(c.socket() is not None for c in self._clients):
            self._poll(0.05)
