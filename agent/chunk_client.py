"""Artifacts over the agent's own broker: `mqtt:///artifacts/sha256/<hex>`, in chunks.

For gateways that may reach only the broker. The agent asks the fleet's chunk server
(fleet/chunk_server.py) for byte ranges on `{prefix}/artifacts/req`:

    {"sha256": "<hex of the URI>", "offset": 0, "length": 262144,
     "reply_to": "{prefix}/dev/{dev}/artifacts"}

and each answer comes to `{prefix}/dev/{dev}/artifacts` with the bytes as payload and the
user properties `sha256`, `offset`, `length`, `size` (the whole artifact) and
`chunk_sha256` (of these bytes), or `error` and an empty payload.

`ChunkClient.open` is a source for `ModelStore.fetch` (`ModelStore.sources["mqtt"]`): it
reads like a file, so the store's own hashing, size checks, deadline and atomic install
apply unchanged. Underneath, it keeps at most `deploy.mqtt_chunks_in_flight` requests of
`deploy.mqtt_chunk_bytes` outstanding, paced to `deploy.mqtt_max_bytes_per_s` (0: no
cap), checks each answer against its `chunk_sha256`, asks again for a chunk that is
corrupt or unanswered after `deploy.mqtt_chunk_timeout_s` or was outstanding across a
reconnect, and appends chunks in order to `state_dir/tmp/mqtt/<hex>.part`, with the offset
reached in `<hex>.offset` (fsynced at most once a second). A download cut off (broker
gone, deadline, agent restart) resumes from that offset: the store re-reads the part
already there, so the final sha256 still covers every byte. `tmp/mqtt/` is a folder,
which `ModelStore.clear_tmp` leaves alone at start; a finished download removes its part,
and parts untouched for a day are removed.

paho's network thread only acknowledges an answer and puts it on a bounded queue
(`put_nowait`; when full, the answer is dropped and asked for again later).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

import msgspec

from edgeinfer.agent.config import DeployConfig
from edgeinfer.agent.mqtt_session import Inbound, MqttSession
from edgeinfer.agent.store import ArtifactError, DownloadCut
from edgeinfer.contract.chunks import ChunkRequest
from edgeinfer.contract.manifest import MQTT_URI_RE, ModelSpec
from edgeinfer.contract.topics import Topics

log = logging.getLogger(__name__)

PARTIAL_DIR = "mqtt"
STALE_PARTIAL_S = 24 * 3600.0
CHECKPOINT_EVERY_S = 1.0


_encode = msgspec.json.Encoder().encode


@dataclass
class _Pending:
    length: int
    sent_at: float  # time.monotonic(); -inf: ask again now
    session: int  # the session's connect_count when it was sent
    tries: int = 0


@dataclass
class DownloadStats:
    """What one download did (logged; read by tests through the agent's log)."""

    resumed_from: int = 0
    requests: int = 0
    repeats: int = 0
    corrupt: int = 0


class ChunkClient:
    """The `mqtt` source of the agent's ModelStore and the handler of chunk answers."""

    def __init__(self, topics: Topics, cfg: DeployConfig, tmp_dir: Path) -> None:
        self._topics = topics
        self._cfg = cfg
        self._dir = tmp_dir / PARTIAL_DIR
        self._session: MqttSession | None = None
        self._lock = threading.Lock()
        self._inbox: queue.Queue[Inbound] | None = None  # of the download under way
        self._stopping = threading.Event()
        self.dropped = 0

    def attach(self, session: MqttSession) -> None:
        self._session = session

    def stop(self) -> None:
        """End a download under way at once (its part is kept): the agent is stopping."""
        self._stopping.set()

    # --- network thread ------------------------------------------------------------------

    def on_chunk(self, inbound: Inbound) -> None:
        """Route handler for `.../artifacts`: acknowledge and hand over, never block."""
        if self._session is not None:
            self._session.ack(inbound.mid, inbound.qos)
        inbox = self._inbox
        if inbox is None:
            return  # no download under way: a late or repeated answer
        try:
            inbox.put_nowait(inbound)
        except queue.Full:
            self.dropped += 1  # asked for again when its request times out

    # --- the store's source ----------------------------------------------------------------

    @contextlib.contextmanager
    def open(self, spec: ModelSpec, timeout_s: float, cut: DownloadCut) -> Iterator[BinaryIO]:
        m = MQTT_URI_RE.match(spec.uri)
        if m is None:
            raise ArtifactError(f"not an mqtt:///artifacts/sha256/<hex> URI: {spec.uri!r}")
        if self._session is None:
            raise ArtifactError(f"cannot fetch {spec.uri}: no MQTT session")
        with self._lock:
            if self._inbox is not None:
                raise ArtifactError(f"cannot fetch {spec.uri}: another MQTT download is running")
            inbox: queue.Queue[Inbound] = queue.Queue(maxsize=2 * self._cfg.mqtt_chunks_in_flight + 4)
            self._inbox = inbox
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            self._remove_stale(keep=m.group(1))
            reader = _ChunkReader(
                spec, m.group(1), self._cfg, self._topics, self._session, inbox, self._dir,
                time.monotonic() + timeout_s, self._stopping, cut,
            )
            completed = False
            try:
                yield cast(BinaryIO, reader)
                completed = reader.complete
            finally:
                reader.close(keep=not completed)
        finally:
            with self._lock:
                self._inbox = None

    def _remove_stale(self, keep: str) -> None:
        now = time.time()
        for entry in self._dir.iterdir():
            if entry.name.startswith(keep):
                continue
            with contextlib.suppress(OSError):
                if now - entry.stat().st_mtime > STALE_PARTIAL_S:
                    entry.unlink()


class _ChunkReader:
    """File-like `read(n)` over chunks requested from the fleet; see the module docstring."""

    def __init__(
        self, spec: ModelSpec, sha256: str, cfg: DeployConfig, topics: Topics,
        session: MqttSession, inbox: queue.Queue[Inbound], directory: Path, deadline: float,
        stopping: threading.Event, cut: DownloadCut,
    ) -> None:
        self._stopping = stopping
        self._cut = cut
        self._spec = spec
        self._sha = sha256
        self._cfg = cfg
        self._topics = topics
        self._session = session
        self._inbox = inbox
        self._deadline = deadline
        self._size = spec.size
        self._part = directory / f"{sha256}.part"
        self._offset_file = directory / f"{sha256}.offset"
        self.stats = DownloadStats()
        self.complete = False
        self._started = time.monotonic()
        resume = self._resume_offset()
        self._f = self._part.open("r+b" if self._part.exists() else "w+b")
        self._f.truncate(resume)
        self._contig = resume  # bytes in the part file, in order, each chunk checked
        self._returned = 0  # bytes handed to the store so far
        self._next = resume  # next offset not yet requested
        self._pending: dict[int, _Pending] = {}
        self._early: dict[int, bytes] = {}  # answers that came before their predecessors
        self._next_send_at = time.monotonic()
        self._checkpointed_at = time.monotonic()
        self.stats.resumed_from = resume
        if resume:
            log.info("fetching %s over MQTT: resuming at offset %d of %d", spec.uri, resume,
                     self._size)
        else:
            log.info("fetching %s over MQTT: %d bytes", spec.uri, self._size)

    def _resume_offset(self) -> int:
        try:
            recorded = int(self._offset_file.read_text().strip())
            on_disk = self._part.stat().st_size
        except (OSError, ValueError):
            return 0
        return max(0, min(recorded, on_disk, self._size))

    # --- what the store calls ---------------------------------------------------------------

    def fileno(self) -> int:
        raise OSError("an MQTT source has no file descriptor")  # the store's watchdog asks

    def read(self, n: int = -1) -> bytes:
        while self._returned == self._contig and self._contig < self._size:
            self._step()
        if self._returned >= self._size:
            self.complete = True
            return b""
        want = self._contig - self._returned if n < 0 else min(n, self._contig - self._returned)
        self._f.seek(self._returned)
        data = self._f.read(want)
        self._returned += len(data)
        return data

    def close(self, keep: bool) -> None:
        try:
            if keep:
                self._checkpoint()
        finally:
            self._f.close()
        elapsed = time.monotonic() - self._started
        s = self.stats
        if keep:
            log.info("MQTT download of %s stopped at offset %d of %d after %.1fs; kept for "
                     "resuming", self._spec.uri, self._contig, self._size, elapsed)
            return
        for path in (self._part, self._offset_file):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        log.info("fetched %s over MQTT: %d bytes in %.2fs from offset %d (%d requests, %d asked "
                 "again, %d corrupt chunks)", self._spec.uri, self._size, elapsed,
                 s.resumed_from, s.requests, s.repeats, s.corrupt)

    # --- the download -----------------------------------------------------------------------

    def _step(self) -> None:
        now = time.monotonic()
        if self._stopping.is_set():
            raise OSError(f"the agent is stopping ({self._contig} of {self._size} bytes kept "
                          "for resuming)")
        if self._cut.fired:  # superseded, or the store's deadline: resumable as well
            self._checkpoint()
            raise OSError(f"download cut ({self._cut.cause}; {self._contig} of {self._size} "
                          "bytes kept for resuming)")
        if now >= self._deadline:
            self._checkpoint()
            raise TimeoutError(
                f"no more chunks within the deadline ({self._contig} of {self._size} bytes "
                "kept for resuming)"
            )
        due = self._send_due(now)
        wait = max(0.005, min(self._deadline - now, due - now, 0.25))
        try:
            inbound = self._inbox.get(timeout=wait)
        except queue.Empty:
            return
        self._accept(inbound)

    def _send_due(self, now: float) -> float:
        """Send what may go now; return when something next falls due."""
        timeout = self._cfg.mqtt_chunk_timeout_s
        if not self._session.subscribed.is_set():
            return now + 0.1  # offline: the requests go once the session is back
        connects = self._session.connect_count
        next_due = now + timeout
        for offset in sorted(self._pending):
            p = self._pending[offset]
            if p.session == connects and now - p.sent_at < timeout:
                next_due = min(next_due, p.sent_at + timeout)
                continue
            if now < self._next_send_at:
                return self._next_send_at
            self.stats.repeats += 1
            self._request(offset, p, now, connects)
        while len(self._pending) < self._cfg.mqtt_chunks_in_flight and self._next < self._size:
            if now < self._next_send_at:
                return self._next_send_at
            # An answer must fit the broker's Maximum Packet Size (with room for properties).
            chunk = min(self._cfg.mqtt_chunk_bytes, max(4096, self._session.max_packet_size - 1024))
            length = min(chunk, self._size - self._next)
            p = _Pending(length, now, connects)
            self._pending[self._next] = p
            self._request(self._next, p, now, connects)
            self._next += length
        return next_due

    def _request(self, offset: int, p: _Pending, now: float, connects: int) -> None:
        body = ChunkRequest(self._sha, offset, p.length, self._topics.artifact_chunks)
        self._session.publish(self._topics.artifact_requests, _encode(body), qos=1)
        p.sent_at, p.session, p.tries = now, connects, p.tries + 1
        self.stats.requests += 1
        cap = self._cfg.mqtt_max_bytes_per_s
        if cap:
            self._next_send_at = max(self._next_send_at, now) + p.length / cap

    def _accept(self, msg: Inbound) -> None:
        if msg.user_property("sha256") != self._sha:
            return  # an answer for another (earlier) download
        try:
            offset = int(msg.user_property("offset") or "")
        except ValueError:
            return
        error = msg.user_property("error")
        if error is not None:
            raise ArtifactError(f"the fleet's chunk server cannot send {self._spec.uri} "
                                f"(offset {offset}): {error}")
        total = msg.user_property("size")
        if total is not None and total != str(self._size):
            raise ArtifactError(
                f"artifact of {self._spec.name}:{self._spec.version} has {total} bytes on the "
                f"fleet's chunk server, the manifest says {self._size}"
            )
        p = self._pending.get(offset)
        if p is None:
            return  # a repeat of a chunk we have
        data = msg.payload
        if len(data) != p.length or hashlib.sha256(data).hexdigest() != msg.user_property(
            "chunk_sha256"
        ):
            self.stats.corrupt += 1
            log.warning("corrupt chunk of %s at offset %d (%d bytes, try %d); asking again",
                        self._spec.uri, offset, len(data), p.tries)
            p.sent_at = -math.inf
            return
        del self._pending[offset]
        self._early[offset] = data
        self._append_ready()

    def _append_ready(self) -> None:
        wrote = False
        while self._contig in self._early:
            data = self._early.pop(self._contig)
            self._f.seek(self._contig)
            self._f.write(data)
            self._contig += len(data)
            wrote = True
        if wrote and time.monotonic() - self._checkpointed_at >= CHECKPOINT_EVERY_S:
            self._checkpoint()

    def _checkpoint(self) -> None:
        """Make the part file durable up to the offset reached, then record that offset."""
        self._f.flush()
        os.fsync(self._f.fileno())
        tmp = self._offset_file.with_suffix(".offset.tmp")
        tmp.write_text(str(self._contig))
        os.replace(tmp, self._offset_file)
        self._checkpointed_at = time.monotonic()
