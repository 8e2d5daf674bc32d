"""The agent's MQTT v5 session on the `mqtt5` codec: one I/O thread, persistent session.

Threads. One I/O thread owns the socket: it connects, reads and parses every packet
(mqtt5, in Rust), hands each PUBLISH to its route's handler, answers PINGs and PUBACKs,
and writes what others left in the outgoing buffer. It waits in a `selectors` loop with a
wake-up socketpair. Not asyncio: every other part of the agent is threads (workers, the
outbox, the intake), so a publish from them would go through `call_soon_threadsafe`, a
self-pipe write and a coroutine per message; here a publish from any thread appends its
bytes to the outgoing buffer under a lock and, when nothing is queued before it, writes
them to the non-blocking socket itself. `publish()` and `ack()` never block on the network.

The rooms:
- `session.py`: `MqttSession`, the link: connect and backoff, the I/O thread's loop,
  keepalive, takeover detection;
- `outbound.py`: what is sent from any thread: the outgoing buffer, packet ids, QoS 1
  publishes in flight or held, resends after a reconnect (`PublishInfo`);
- `inbound.py`: what is heard: reading and parsing, routing to handlers, packets the codec
  refuses, payloads over a route's limit, acknowledgements and control packets;
- `messages.py`: what the session and its owner hand each other (`Inbound`, `Route`,
  `Retained`) and the route table;
- `backoff.py`: the waits before connecting again; `link_end.py`: why a link ends.
The bytes themselves (framing, salvage, the socket) are agent/mqtt_wire.py's.
"""

from edgeinfer.agent.mqtt_session.backoff import backoff_delay, takeover_delay
from edgeinfer.agent.mqtt_session.messages import (
    Handler,
    Inbound,
    Retained,
    Route,
    session_of_mid,
)
from edgeinfer.agent.mqtt_session.outbound import (
    RC_NO_CONN,
    RC_PAYLOAD_SIZE,
    RC_QUEUE_SIZE,
    RC_SUCCESS,
    PublishInfo,
)
from edgeinfer.agent.mqtt_session.session import RECEIVE_MAXIMUM, MqttSession

__all__ = [
    "RC_NO_CONN", "RC_PAYLOAD_SIZE", "RC_QUEUE_SIZE", "RC_SUCCESS", "RECEIVE_MAXIMUM",
    "Handler", "Inbound", "MqttSession", "PublishInfo", "Retained", "Route",
    "backoff_delay", "session_of_mid", "takeover_delay",
]
