"""The agent: wires config, store, runtimes, reconciler, scheduler, MQTT and telemetry."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec

from edgeinfer.agent import __version__, linkstate
from edgeinfer.agent.chunk_client import ChunkClient
from edgeinfer.agent.config import AgentConfig
from edgeinfer.agent.diskalarm import DiskAlarm
from edgeinfer.agent.journal import DiskFull, Journal, OutMessage
from edgeinfer.agent.local_models import LocalModels
from edgeinfer.agent.local_replies import LOCAL_PREFIX, LocalReplies
from edgeinfer.agent.metrics import Metrics
from edgeinfer.agent.mqtt_session import Inbound, MqttSession, Retained, Route, session_of_mid
from edgeinfer.agent.outbox import OutboxPublisher
from edgeinfer.agent.reconciler import Reconciler
from edgeinfer.agent.scheduler import Scheduler
from edgeinfer.agent.served import ServedModels
from edgeinfer.agent.shadow import with_shadow_stats
from edgeinfer.agent.store import ModelStore
from edgeinfer.agent.telemetry import TelemetryLoop, start_prometheus
from edgeinfer.contract import documents
from edgeinfer.contract.documents import Hardware, Reported, State
from edgeinfer.contract.telemetry import Durability, ShadowFigures, Telemetry
from edgeinfer.contract.topics import Topics
from edgeinfer.runtimes.hardware import HardwareInfo, detect

log = logging.getLogger(__name__)

# `mid_tag`s of the agent's MQTT sessions: a job's PUBACK goes back on the one it came on.
DEVICE_SESSION = 0
POOL_SESSION = 1
# Leaving the pools before a drain: quiet this long on the pool link means nothing more is
# coming (a loopback broker sends the next queued job within a millisecond of a PUBACK).
POOL_SETTLE_S = 0.3
# Session events also written to the state dir for `edge-agent doctor` (agent/linkstate.py).
_LINK_EVENTS = frozenset({"broker_disconnected", "broker_refused", linkstate.TAKEN_OVER})


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class _Sessions:
    """The agent's MQTT sessions as one loop for the watchdog: as old as the oldest."""

    def __init__(self, *sessions: MqttSession | None) -> None:
        self._sessions = [x for x in sessions if x is not None]

    def loop_age(self) -> float:
        return max(x.loop_age() for x in self._sessions)


class Agent:
    def __init__(self, cfg: AgentConfig, hardware: HardwareInfo | None = None) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.topic_prefix, cfg.device_id)
        self.session_id = uuid.uuid4().hex
        self.started_at = _now_iso()
        self.hardware = hardware if hardware is not None else detect()
        # `reported.hardware`: the machine does not change while the agent runs.
        self.hardware_report = msgspec.convert(self.hardware.summary(), Hardware)
        cfg.state_path.mkdir(parents=True, exist_ok=True)
        self.store = ModelStore(cfg.state_path)
        self.registry = ServedModels()
        self.metrics = Metrics()
        self.journal = Journal(cfg.state_path / "journal.sqlite3", cfg.journal.synchronous)
        self.events_dropped = 0
        self.disk = DiskAlarm(cfg.state_path, self.metrics, self.emit_event)
        self.reconciler = Reconciler(
            cfg, self.store, self.registry, self.hardware, self.emit_event, self.publish_reported
        )
        # models.local_dir: a second source of models beside the fleet's manifest.
        self.local_models = (
            LocalModels(Path(cfg.models.local_dir), cfg.models.scan_interval_s,
                        self.reconciler.offer_local) if cfg.models.local_dir else None)
        # mqtt:// artifacts: chunks asked for over this session (agent/chunk_client.py).
        self.artifacts = ChunkClient(self.topics, cfg.deploy, self.store.tmp)
        self.store.sources["mqtt"] = self.artifacts.open
        routes = [
            Route(self.topics.desired, 1, self._on_desired),
            Route(self.topics.artifact_chunks, 1, self.artifacts.on_chunk),
            # Job routes also take a job whose packet could not be read in full, or whose
            # payload is over jobs.max_message_bytes (dropped unread): the scheduler
            # answers it INVALID_ARGUMENT instead of leaving it unacknowledged.
            Route(self.topics.jobs, 1, self._on_job, takes_unreadable=True,
                  max_payload=cfg.jobs.max_message_bytes),
            # Our own retained state: another process's session there means a second agent
            # with this device id (mosquitto < 2.0.15 says nothing when it takes us over).
            Route(self.topics.state, 1, self._on_state),
        ]
        self.mqtt = MqttSession(
            client_id=cfg.device_id,
            cfg=cfg.broker,
            routes=routes,
            will=Retained(self.topics.state, self._state_payload("offline")),
            on_connected=self._on_connected,
            on_published=self._on_published,
            on_event=self._session_event,
            mid_tag=DEVICE_SESSION,
        )
        self.pool_mqtt = self._pool_session() if cfg.jobs.pools else None
        self.network = _Sessions(self.mqtt, self.pool_mqtt)  # the watchdog's network probe
        self.artifacts.attach(self.mqtt)
        self.outbox = OutboxPublisher(
            self.journal,
            self._publish_out,
            self.mqtt.connected,
            lambda: self.mqtt.max_packet_size,
            window=cfg.outbox.window,
            max_messages=cfg.outbox.max_messages,
            max_bytes=cfg.outbox.max_bytes,
            alarm=self.disk,
        )
        # The local KServe endpoint (http.listen): its requests' answers come back through
        # `local` instead of the broker (agent/local_replies.py). There even with the
        # endpoint off: a journaled HTTP job recovered after a restart is then answered to
        # nobody (dropped), never to the broker's results topic.
        self.local = LocalReplies()
        reply_prefixes = (*cfg.reply_prefixes_resolved(), LOCAL_PREFIX)
        self.scheduler = Scheduler(
            registry=self.registry,
            metrics=self.metrics,
            journal=self.journal,
            outbox=self.outbox,
            ack=self._ack,
            send_now=self._send_now,
            results_topic=self.topics.results,
            reply_prefixes=reply_prefixes,
            cfg=cfg.jobs,
            alarm=self.disk,
            # Told each run's outcome: demotes a runtime that keeps failing (failover.py).
            observer=self.reconciler.failover,
            # What `reported.models` lists, for OIP's readiness queries (agent/queries.py).
            statuses=self.reconciler.statuses,
            local=self.local,
        )
        self.http: Any = None  # started with the agent (agent/http_endpoint/)
        self.telemetry = TelemetryLoop(
            cfg.telemetry.interval_s,
            cfg.state_path,
            self.metrics,
            self.scheduler.depth,
            self._publish_telemetry,
            self.durability,
        )
        self._stop_prometheus: Any = None
        self._stopped = threading.Event()
        self._reported_lock = threading.Lock()
        self._reported_shadows: dict[str, ShadowFigures] = {}  # as `reported` last had them

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        t0 = time.monotonic()
        removed = self.store.clear_tmp()
        if removed:
            log.info("removed %d unfinished download(s)", removed)
        # Serve what we had before the broker answers: a gateway must work offline.
        restored = self.reconciler.restore()
        log.info("restored %d model(s) in %.2fs", restored, time.monotonic() - t0)
        if self.local_models is not None:
            self.reconciler.serve_local(self.local_models.settle())
        self.scheduler.recover()
        self.scheduler.start()
        self.outbox.start()
        self.reconciler.start()
        if self.local_models is not None:
            self.local_models.start()
        self.mqtt.start()
        if self.pool_mqtt is not None:
            self.pool_mqtt.start()
        self.telemetry.start()
        self._start_http()
        if self.cfg.telemetry.prometheus_port:
            port = self.cfg.telemetry.prometheus_port
            try:
                self._stop_prometheus = start_prometheus(
                    port, self.metrics, self.scheduler.depth, self.cfg.state_path
                )
            except OSError as exc:
                # An optional scrape endpoint must not take inference down with it (nor
                # crash-loop the service): say why, keep serving, telemetry still goes out.
                log.error("Prometheus endpoint on 127.0.0.1:%d not started (%s); set "
                          "telemetry.prometheus_port to a free port or 0", port, exc.strerror)

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.http is not None:
            self.http.stop()  # first: no request waits for a scheduler that has stopped
        self.telemetry.stop()
        self.artifacts.stop()  # an MQTT download under way ends now (its part is kept)
        if self.local_models is not None:
            self.local_models.stop()
        self.reconciler.stop()
        self.scheduler.stop()
        if self.mqtt.connected.is_set():
            # Answers still waiting for a PUBACK would be sent again after a restart anyway;
            # waiting a moment here spares the clients the duplicates.
            self.outbox.drain(2.0)
            # A clean stop says offline itself: the broker sends the will only on a lost link.
            info = self._publish(self.topics.state, self._state_payload("offline"), retain=True)
            info.wait_for_publish(2.0)
        self.outbox.stop()
        if self.pool_mqtt is not None:
            self.pool_mqtt.stop()
        self.mqtt.stop()
        if self._stop_prometheus is not None:
            self._stop_prometheus()
        self.registry.close_all()
        self.journal.close()

    def _start_http(self) -> None:
        if not self.cfg.http.listen:
            return
        # Here, not at the top: aiohttp is loaded only by an agent that serves HTTP.
        from edgeinfer.agent.http_endpoint import HttpEndpoint  # noqa: PLC0415

        endpoint = HttpEndpoint(self.cfg.http, self.cfg.jobs.max_message_bytes,
                                self.scheduler.submit, self.scheduler.taking_jobs, self.local,
                                self.topics.jobs)
        try:
            endpoint.start()
        except OSError as exc:
            # As the Prometheus endpoint: MQTT inference goes on; say why, loudly.
            log.error("KServe endpoint on %s not started (%s); set http.listen to a free "
                      "address or leave it empty", self.cfg.http.listen, exc)
            return
        self.http = endpoint

    # --- MQTT glue -----------------------------------------------------------------------

    def _pool_session(self) -> MqttSession:
        """The pool jobs' own session: session expiry 0, its own short keepalive, a client id
        of its own per process.

        Why not the device's persistent session: mosquitto (2.0.11 measured,
        bench/probes/shared_session_end.py) hands a shared subscription's messages round
        robin to every member that has a session, connected or not, and when a member's
        session ends it drops what it held, queued or in flight: never handed to another
        member. On the persistent session a dead member took half the pool's jobs for up to
        broker.session_expiry_s and then lost them. With expiry 0 the broker stops routing
        to a member once it sees the link gone (at once for a dead process, 1.5 x
        jobs.pool_keepalive_s for a silent host); a longer expiry would not keep those jobs
        for another member, only add the ones routed to the dead one meanwhile. What a
        member held but had not journaled when its link ended is lost with it (the client's
        retry, same job id, recovers it); what it journaled is answered when it comes back.

        The client id is not the device id (that would take the device session over) and
        carries this process's session id: with session expiry 0 nothing is left to resume,
        and two agents given one device id then serve the pool side by side instead of
        taking each other's pool session over. `.` is outside the device id alphabet, so it
        names no other device's session.
        """
        cfg = self.cfg
        broker = msgspec.structs.replace(cfg.broker, session_expiry_s=0,
                                         keepalive_s=cfg.jobs.pool_keepalive_s)
        return MqttSession(
            client_id=f"{cfg.device_id}.pool.{self.session_id[:12]}",
            cfg=broker,
            routes=[Route(self.topics.pool_subscription(p), 1, self._on_job,
                          takes_unreadable=True, max_payload=cfg.jobs.max_message_bytes)
                    for p in cfg.jobs.pools],
            will=None,  # the device session's will speaks for the agent
            on_connected=lambda: None,
            on_event=lambda kind, fields: self._session_event(kind, {**fields, "link": "pool"}),
            mid_tag=POOL_SESSION,
        )

    def leave_pools(self, timeout: float) -> None:
        """Before a drain: take no new pool jobs, and journal (and acknowledge) every pool
        job the broker already sent us. Left unacknowledged, as a drain leaves the device's
        jobs for the next start, they would be dropped with the pool session (expiry 0)."""
        pool = self.pool_mqtt
        if pool is None:
            return
        deadline = time.monotonic() + timeout
        if not pool.unsubscribe_all(timeout):
            log.warning("no UNSUBACK from the broker for the pool subscription within %gs",
                        timeout)
        # What the broker had queued for us follows the UNSUBACK as PUBACKs free room.
        while time.monotonic() < deadline:
            if self.scheduler.intake_settled() and pool.idle_for() >= POOL_SETTLE_S:
                break
            time.sleep(0.02)
        log.info("left the pool(s) %s", ", ".join(self.cfg.jobs.pools))

    def _ack(self, mid: int, qos: int) -> None:
        """A job's PUBACK, on the session it came in on."""
        if session_of_mid(mid) == POOL_SESSION and self.pool_mqtt is not None:
            self.pool_mqtt.ack(mid, qos)
        else:
            self.mqtt.ack(mid, qos)

    def _session_event(self, kind: str, fields: dict[str, Any]) -> None:
        if kind in _LINK_EVENTS and fields.get("link") != "pool":
            linkstate.record(self.cfg.state_path, kind, fields)
        self.emit_event(kind, **fields)

    def _on_state(self, inbound: Inbound) -> None:
        """Our retained state, as the broker hands it over on every subscribe (I/O thread)."""
        self.mqtt.ack(inbound.mid, inbound.qos)
        doc = documents.read_state(inbound.payload)
        other = doc.session_id if doc is not None else None
        if doc is None or other is None or other == self.session_id:
            return
        # On the first connect a foreign session id is most likely our own previous run
        # (its will says offline); on a reconnect, between our last link and this one,
        # another process with our device id connected and wrote it.
        if self.mqtt.connect_count > 1 or doc.state == "online":
            self.mqtt.note_twin(
                f"the retained state on {self.topics.state} is from another agent's session "
                f"{other} (state {doc.state!r}, started {doc.started_at})")

    def _publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> Any:
        return self.mqtt.publish(topic, payload, qos=qos, retain=retain)

    def _send_now(self, topic: str, payload: bytes, correlation: bytes | None,
                  user_properties: Sequence[tuple[str, str]]) -> None:
        if self.local.is_local(topic):
            self.local.deliver(topic, payload, user_properties)
            return
        self.mqtt.publish(topic, payload, qos=1, correlation_data=correlation,
                          user_properties=user_properties)

    def _publish_out(self, msg: OutMessage) -> Any:
        if self.local.is_local(msg.topic):
            # Handed to its request when it was recorded (agent/answers.py): the outbox
            # row is only forgotten, as if the broker had acknowledged it.
            mid = self.local.swallowed()
            self.outbox.on_published(mid, False)
            return SimpleNamespace(mid=mid)
        return self.mqtt.publish(
            msg.topic, msg.payload, qos=msg.qos, correlation_data=msg.correlation,
            user_properties=msg.user_props,
        )

    def _on_published(self, mid: int, refused: bool) -> None:
        self.outbox.on_published(mid, refused)

    def _on_job(self, inbound: Inbound) -> None:
        self.scheduler.submit(inbound)

    def _on_desired(self, inbound: Inbound) -> None:
        # Retained: the broker hands it over again on every reconnect, so ack at once.
        self.mqtt.ack(inbound.mid, inbound.qos)
        self.reconciler.offer(inbound.payload)

    def _on_connected(self) -> None:
        # Birth and the retained reported state, on every (re)connect.
        self._publish(self.topics.state, self._state_payload("online"), retain=True)
        self.publish_reported()

    def _state_payload(self, state: str) -> bytes:
        return documents.encode(State(state=state, agent_version=__version__,
                                      session_id=self.session_id, started_at=self.started_at))

    def durability(self) -> Durability:
        """Journal and outbox fill and what their bounds turned away, for telemetry."""
        return Durability(
            journal_queued=self.scheduler.depth(),
            journal_limit=self.cfg.jobs.queue_size,
            jobs_rejected_full=self.scheduler.rejected,
            duplicates_answered=self.scheduler.duplicates,
            executions=self.scheduler.executed,
            outbox_messages=self.outbox.messages,
            outbox_bytes=self.outbox.bytes,
            outbox_limit_messages=self.cfg.outbox.max_messages,
            outbox_limit_bytes=self.cfg.outbox.max_bytes,
            outbox_refused_by_broker=self.outbox.refused,
            outbox_oversize_replaced=self.outbox.oversize,
            events_dropped=self.events_dropped,
        )

    def reported(self) -> Reported:
        return Reported(
            device_id=self.cfg.device_id,
            agent_version=__version__,
            revision=self.reconciler.applied_revision,
            rollback=self.reconciler.applied_rollback,
            models=with_shadow_stats(self.reconciler.statuses(), self.metrics.shadow_figures()),
            last_error=self.reconciler.last_error,
            hardware=self.hardware_report,
            updated_at=_now_iso(),
        )

    def _publish_telemetry(self, doc: Telemetry) -> None:
        self._publish(self.topics.telemetry, documents.encode(doc), qos=0)
        # `reported` holds the shadows' figures too (shadow_stats): refreshed at this pace
        # while they change, not on every copy.
        shadows = doc.inference.shadows
        if shadows and shadows != self._reported_shadows:
            self._reported_shadows = shadows
            self.publish_reported()

    def publish_reported(self) -> None:
        # Offline, a queued copy would be resent after the fresh one that every reconnect
        # publishes, and the stale one would stay retained. So only publish while connected.
        if not self.mqtt.connected.is_set():
            return
        # Build and publish under one lock: a snapshot taken earlier never goes out later.
        with self._reported_lock:
            self._publish(self.topics.reported, documents.encode(self.reported()), retain=True)

    def emit_event(self, kind: str, **fields: Any) -> None:
        """Publish event `kind` (docs/protocol.md "Events"); fields that are None are left
        out. Every emitter in the agent comes through here."""
        log.info("event %s %s", kind, fields)
        if not self.outbox.has_room():
            self.events_dropped += 1  # answers have the outbox's room; events give way
            return
        event, extra = documents.event(kind, _now_iso(), self.cfg.device_id, fields)
        payload = documents.encode_event(event, extra)
        try:
            self.journal.enqueue(self.topics.events, payload)
        except DiskFull:
            # The outbox is on the full disk (`disk_full` itself comes this way): sent
            # directly, kept by the session until its PUBACK but not across a restart.
            self._publish(self.topics.events, payload)
            return
        self.outbox.added(len(payload))
