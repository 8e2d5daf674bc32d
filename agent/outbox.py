"""Sends the journal's outbox to the broker in order, and forgets a message only on PUBACK.

Up to `window` messages are handed to paho at once; paho resends them itself after a
reconnect, and the rest wait on disk. After a restart everything still in the outbox is
sent again.

Messages go out in the order of their outbox rows (`seq`). The thread that has just
committed answers (a worker, or the intake: agent/answers.py's group commit) hands them
over (`hand_over_many`) and, when they are next in line, publishes them itself:
the common case costs no read of the table and no wake-up of this thread. Rows that nobody
handed over (events, partial answers, refusals, what a restart left) and anything that
arrives out of line are read from the table by the outbox thread.

A message the broker could never take (larger than its maximum packet size) is replaced by
a small error answer instead of being resent forever.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from edgeinfer.agent.diskalarm import DiskAlarm
from edgeinfer.agent.journal import DiskFull, Journal, OutMessage
from edgeinfer.agent.protocol import encode_error, peek_id
from edgeinfer.contract.errors import Code

log = logging.getLogger(__name__)

# Bytes of a PUBLISH packet beside topic and payload: fixed header, lengths, properties.
PACKET_OVERHEAD = 512

# PUBACKs settled together: wait up to ACK_LINGER_S for ACK_BATCH of them.
ACK_BATCH = 32
ACK_LINGER_S = 0.002

PublishFn = Callable[[OutMessage], Any]  # returns agent.mqtt_session.PublishInfo (.mid)


class OutboxPublisher:
    def __init__(
        self,
        journal: Journal,
        publish: PublishFn,
        connected: threading.Event,
        max_packet_size: Callable[[], int],
        window: int = 256,
        max_messages: int = 10_000,
        max_bytes: int = 64 * 1024 * 1024,
        alarm: DiskAlarm | None = None,
    ) -> None:
        self._journal = journal
        self._alarm = alarm
        # Acknowledged rows whose DELETE found the disk full: forgotten on a later round
        # (this thread only). Until then they count as waiting, and a restart sends them
        # again (a duplicate the client tells by its id), but nothing is lost.
        self._unforgotten: list[tuple[int, int]] = []
        self._publish = publish
        self._connected = connected
        self._max_packet = max_packet_size
        self._window = window
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._cond = threading.Condition()
        # paho mid -> outbox seq. Only this thread reads or writes it: a PUBACK is recorded
        # by the network thread in `_acked` and settled here after the mid was noted. paho
        # hands out mids in sequence, so a mid comes back only 65,535 publishes later, far
        # beyond the window.
        # Sending (by this thread or a worker) holds _send_lock: it keeps the order of rows
        # and guards _inflight and _last_sent. Never taken under _cond or by the network
        # thread.
        self._send_lock = threading.Lock()
        self._inflight: dict[int, tuple[int, int]] = {}  # paho mid -> (seq, payload bytes)
        self._acked: list[tuple[int, bool]] = []  # (mid, refused) from the network thread
        self._last_sent = journal.outbox_start()
        self._handed: dict[int, OutMessage] = {}  # seq -> message, under _cond
        self._stop = False
        self._thread: threading.Thread | None = None
        count, size = journal.outbox_stats()
        self.messages = count
        self.bytes = size
        self.refused = 0
        self.oversize = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def added(self, size: int) -> None:
        """A row was written to the outbox (any thread)."""
        with self._cond:
            self.messages += 1
            self.bytes += size
            self._cond.notify()

    def hand_over(self, msg: OutMessage) -> None:
        """A row just written to the outbox, with its contents (any thread, after the
        commit): sent from here when it is next in line, else by the outbox thread."""
        self.hand_over_many((msg,))

    def hand_over_many(self, msgs: Sequence[OutMessage]) -> None:
        """Rows of one commit (a group of answers), in seq order: `hand_over` for each, with
        one lock round and one pump for the group."""
        keep = self._connected.is_set()
        with self._cond:
            for msg in msgs:
                self.messages += 1
                self.bytes += len(msg.payload)
                if keep and len(self._handed) < self._window:
                    self._handed[msg.seq] = msg
        if not keep or not self._pump():
            self.wake()

    def _pump(self) -> bool:
        """Send handed-over messages while each is the next row; False when some are left
        for the outbox thread (a row before them was not handed over, or the window is full)."""
        with self._send_lock:
            while len(self._inflight) < self._window and self._connected.is_set():
                with self._cond:
                    msg = self._handed.pop(self._last_sent + 1, None)
                if msg is None:
                    break
                self._send(msg)
            with self._cond:
                return not self._handed

    def _send(self, msg: OutMessage) -> None:
        """Under _send_lock, never under _cond: paho's publish takes paho's message lock,
        which the network thread holds while it calls on_published (which takes _cond)."""
        info = self._publish(self._fit(msg))
        self._inflight[int(info.mid)] = (msg.seq, len(msg.payload))
        self._last_sent = msg.seq

    def has_room(self) -> bool:
        return self.messages < self._max_messages and self.bytes < self._max_bytes

    def wait_room(self, timeout: float) -> bool:
        """Backpressure for workers: wait until the outbox is below its bounds."""
        with self._cond:
            return self._cond.wait_for(self.has_room, timeout)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def on_published(self, mid: int, refused: bool) -> None:
        """The session's PUBACK callback (network thread): record and return at once.

        Wakes this thread for the first PUBACK of a group and for the ACK_BATCH-th: in
        between it lingers (ACK_LINGER_S) and would only look and sleep again."""
        with self._cond:
            self._acked.append((mid, refused))
            if len(self._acked) == 1 or len(self._acked) >= ACK_BATCH or refused:
                # All: workers held back in wait_room wait on this condition too, and one
                # of them must not take the wake-up meant for this thread.
                self._cond.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until the outbox is empty (for a clean stop); True when it is."""
        with self._cond:
            return self._cond.wait_for(lambda: self.messages <= 0, timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: self._stop or bool(self._acked) or self._can_send(), timeout=0.5
                )
                if self._stop:
                    return
                if 0 < len(self._acked) < ACK_BATCH and not self._can_send() and self.has_room():
                    # Forgetting acknowledged rows can wait a moment: one DELETE for many
                    # PUBACKs instead of one each. Answers are not held back by it.
                    self._cond.wait_for(lambda: len(self._acked) >= ACK_BATCH or self._stop
                                        or self._can_send(), ACK_LINGER_S)
                acked, self._acked = self._acked, []
            try:
                self._settle(acked)
                if self._connected.is_set():
                    self._send_more()
            except Exception:
                log.exception("outbox failed; retrying")
                with self._cond:
                    self._cond.wait(1.0)

    def _can_send(self) -> bool:
        """Under _cond: rows wait that nobody is sending."""
        return (
            self._connected.is_set()
            and len(self._inflight) < self._window
            and self.messages > len(self._inflight)
            and (not self._handed or self._last_sent + 1 not in self._handed)
        )

    def _settle(self, acked: list[tuple[int, bool]]) -> None:
        done: list[tuple[int, int]] = []
        with self._send_lock:
            for mid, refused in acked:
                sent = self._inflight.pop(mid, None)
                if sent is None:
                    continue
                done.append(sent)
                if refused:
                    self.refused += 1
                    log.error("broker refused outbox message %d; dropped", sent[0])
        done, self._unforgotten = self._unforgotten + done, []
        if not done:
            return
        try:
            self._journal.acked([seq for seq, _ in done])
        except DiskFull as exc:
            self._unforgotten = done
            if self._alarm is not None:
                self._alarm.full("outbox", exc)
            return
        if self._alarm is not None:
            self._alarm.clear("outbox")
        with self._cond:
            self.messages -= len(done)
            self.bytes -= sum(size for _, size in done)
            self._cond.notify_all()

    def _send_more(self) -> None:
        self._pump()
        with self._send_lock:
            room = self._window - len(self._inflight)
            with self._cond:
                unsent = self.messages > len(self._inflight)
            if room <= 0 or not unsent:
                return
            rows = self._journal.outbox_after(self._last_sent, room)
            if not rows and self.messages > len(self._inflight):
                # The counters promised more than the table holds: trust the table, so the
                # loop waits instead of spinning.
                count, size = self._journal.outbox_stats()
                with self._cond:
                    self.messages, self.bytes = count, size
                    self._handed.clear()
                return
            for msg in rows:
                self._send(msg)
            with self._cond:
                # Handed-over rows the table has just given us went out with it.
                for seq in [s for s in self._handed if s <= self._last_sent]:
                    del self._handed[seq]
        self._pump()

    def _fit(self, msg: OutMessage) -> OutMessage:
        limit = self._max_packet()
        if len(msg.payload) + len(msg.topic.encode()) + PACKET_OVERHEAD <= limit:
            return msg
        self.oversize += 1
        job_id = peek_id(msg.payload[: 64 * 1024]) if msg.payload[:1] == b"{" else None
        text = (
            f"the answer is {len(msg.payload)} bytes, over the broker's maximum packet size of "
            f"{limit} bytes; ask for fewer outputs or smaller inputs"
        )
        log.warning("outbox message %d: %s", msg.seq, text)
        return OutMessage(msg.seq, msg.topic, encode_error(job_id, Code.RESOURCE_EXHAUSTED, text),
                          msg.qos, msg.correlation, ())
