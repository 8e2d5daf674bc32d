"""The fleet's chunk server: artifacts of an ArtifactStore over MQTT, for `mqtt://` URIs.

Agents that may reach only the broker fetch `mqtt:///artifacts/sha256/<hex>` in ranges
(agent/chunk_client.py, docs/protocol.md "Artifacts over MQTT"). This server subscribes
to `{prefix}/artifacts/req` (a shared subscription, so several `edge-fleet serve` split the
work) and answers each request `{"sha256", "offset", "length", "reply_to"}` on `reply_to`
(which must be `{prefix}/dev/<device id>/artifacts`) with the bytes and the user
properties `sha256`, `offset`, `length`, `size`, `chunk_sha256`; a request it cannot serve
is answered with `error` (and an empty payload) when it names a usable `reply_to`.

paho's network thread only queues requests (bounded; beyond it they are dropped and the
agent asks again); worker threads read and publish. Runs inside `edge-fleet serve` and
standalone (tests). Test hooks: `corrupt_offsets` (each listed offset is answered once
with a byte flipped after hashing) and `requests` (every request served, in order).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgeinfer.contract.brokerurl import parse_broker_url
from edgeinfer.contract.chunks import ChunkRequest
from edgeinfer.contract.topics import artifact_requests
from edgeinfer.contract.transport import TransportSecurity
from edgeinfer.fleet.artifacts import ArtifactStore

log = logging.getLogger(__name__)

MAX_CHUNK = 16 * 1024 * 1024  # the agent's deploy.mqtt_chunk_bytes allows no more
SHARE_GROUP = "edge-fleet-artifacts"
_HEX_RE = re.compile(r"^[0-9a-f]{64}$")
_decode = msgspec.json.Decoder(ChunkRequest).decode


def mqtt_artifact_uri(sha256: str) -> str:
    """`mqtt:///artifacts/sha256/<hex>`: the artifact over the device's own broker."""
    return f"mqtt:///artifacts/sha256/{sha256}"


@dataclass(frozen=True)
class Served:
    """One request as the server took it (the test hook `requests`)."""

    at: float  # time.monotonic()
    sha256: str
    offset: int
    length: int
    reply_to: str


class ChunkServer:
    def __init__(
        self, store: ArtifactStore, broker_url: str, *, prefix: str = "edge/v1",
        client_id: str = "edge-fleet-artifacts", security: TransportSecurity | None = None,
        workers: int = 2, queue_size: int = 256, session_expiry_s: int = 3600,
    ) -> None:
        self.store = store
        self.prefix = prefix.strip("/")
        self.topic = artifact_requests(self.prefix)
        self.address = parse_broker_url(broker_url)
        self._reply_re = re.compile(rf"^{re.escape(self.prefix)}/dev/[A-Za-z0-9_-]{{1,64}}/artifacts$")
        self._session_expiry_s = session_expiry_s
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=queue_size)
        self._workers = [threading.Thread(target=self._work, name=f"chunks-{i}", daemon=True)
                         for i in range(workers)]
        self.connected = threading.Event()
        self._lock = threading.Lock()
        # Test hooks.
        self.requests: list[Served] = []
        self.corrupt_offsets: set[int] = set()
        self.dropped = 0
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=client_id, protocol=paho.MQTTv5)
        (security or TransportSecurity()).apply(self.client, self.address)
        self.client.reconnect_delay_set(min_delay=1, max_delay=10)
        self.client.max_queued_messages_set(0)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> ChunkServer:
        for w in self._workers:
            w.start()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self._session_expiry_s
        self.client.connect_async(self.address.host, self.address.port, 30, clean_start=False,
                                  properties=props)
        self.client.loop_start()
        return self

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()
        for _ in self._workers:
            with contextlib.suppress(queue.Full):
                self._queue.put(None, timeout=1.0)
        for w in self._workers:
            w.join(5.0)

    def __enter__(self) -> ChunkServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -- paho callbacks (network thread: never block) -------------------------------

    def _on_connect(self, client: paho.Client, _userdata: Any, _flags: paho.ConnectFlags,
                    reason_code: ReasonCode, _properties: Properties | None) -> None:
        if reason_code.is_failure:
            log.warning("broker %s refused the chunk server: %s", self.address, reason_code)
            return
        client.subscribe(f"$share/{SHARE_GROUP}/{self.topic}", qos=1)
        self.connected.set()
        log.info("chunk server: answering %s on %s", self.topic, self.address)

    def _on_disconnect(self, _client: paho.Client, _userdata: Any, _flags: paho.DisconnectFlags,
                       reason_code: ReasonCode, _properties: Properties | None) -> None:
        self.connected.clear()
        log.info("chunk server lost %s: %s", self.address, reason_code)

    def _on_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            self._queue.put_nowait(bytes(msg.payload))
        except queue.Full:
            self.dropped += 1  # the agent asks again when its request times out

    # -- workers --------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            payload = self._queue.get()
            if payload is None:
                return
            try:
                self._serve(payload)
            except Exception:
                log.exception("chunk request not served")

    def _serve(self, payload: bytes) -> None:
        try:
            req = _decode(payload)
        except msgspec.DecodeError as exc:
            log.warning("chunk request refused: %s", exc)
            return
        if not self._reply_re.match(req.reply_to):
            log.warning("chunk request with reply_to %r refused (must be %s/dev/<id>/artifacts)",
                        req.reply_to, self.prefix)
            return
        with self._lock:
            self.requests.append(Served(time.monotonic(), req.sha256, req.offset, req.length,
                                        req.reply_to))
        props = [("sha256", req.sha256), ("offset", str(req.offset))]
        if not _HEX_RE.match(req.sha256):
            self._answer(req.reply_to, b"", [*props, ("error", "not a sha256 hex digest")])
            return
        artifact = self.store.get(req.sha256)
        if artifact is None:
            self._answer(req.reply_to, b"", [*props, ("error", "no such artifact")])
            return
        if req.offset < 0 or req.offset >= artifact.size or not 0 < req.length <= MAX_CHUNK:
            self._answer(req.reply_to, b"", [*props, ("size", str(artifact.size)), (
                "error", f"range {req.offset}+{req.length} outside the artifact's "
                         f"{artifact.size} bytes (at most {MAX_CHUNK} a chunk)")])
            return
        with artifact.path.open("rb") as f:
            f.seek(req.offset)
            data = f.read(min(req.length, artifact.size - req.offset))
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            corrupt = req.offset in self.corrupt_offsets and bool(data)
            self.corrupt_offsets.discard(req.offset)
        if corrupt:
            flipped = bytearray(data)
            flipped[len(flipped) // 2] ^= 0xFF
            data = bytes(flipped)
        self._answer(req.reply_to, data, [*props, ("length", str(len(data))),
                                          ("size", str(artifact.size)),
                                          ("chunk_sha256", digest)])

    def _answer(self, topic: str, data: bytes, user: list[tuple[str, str]]) -> None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.UserProperty = user
        self.client.publish(topic, data, qos=1, properties=props)

    def offsets_served(self, sha256: str | None = None) -> list[int]:
        with self._lock:
            return [r.offset for r in self.requests if sha256 is None or r.sha256 == sha256]
