"""The plain paho responders the agent is compared against (bench/echo.py, bench/naive.py):
an MQTT v5 client with TCP_NODELAY on its socket that subscribes at QoS 1, prints its ready
line once the broker has granted the subscription, and runs until SIGTERM or a lost link."""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edgeinfer.contract.brokerurl import parse_broker_url

OnMessage = Callable[[paho.Client, Any, paho.MQTTMessage], None]


def serve(broker: str, client_id: str, topics: Sequence[str], on_message: OnMessage, *,
          ready: str, max_inflight: int | None = None) -> int:
    """Answer on `topics` with `on_message` (on paho's network thread); the exit status."""
    address = parse_broker_url(broker)
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=paho.MQTTv5)
    subscribed = threading.Event()

    def on_socket_open(_c: Any, _u: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def on_connect(c: paho.Client, _u: Any, _f: Any, _rc: Any, _p: Any) -> None:
        c.subscribe([(topic, 1) for topic in topics])

    def on_subscribe(*_a: Any) -> None:
        subscribed.set()

    client.on_socket_open = on_socket_open
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    if max_inflight is not None:
        client.max_inflight_messages_set(max_inflight)
    client.connect(address.host, address.port, keepalive=30)
    signal.signal(signal.SIGTERM, lambda *_: client.disconnect())
    client.loop_start()
    if not subscribed.wait(10):
        print(f"{ready.split(maxsplit=1)[0]}: no SUBACK within 10 s", file=sys.stderr)
        return 1
    print(ready, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        while client.is_connected():
            threading.Event().wait(0.5)
    client.loop_stop()
    return 0
