"""`edge-fleet simulate`: many simulated agents as real MQTT clients in one process.

    edge-fleet simulate --devices 1000 --report-every 10s [--duration 600] [--id-prefix sim-]

Each simulated device is its own MQTT v5 client (client id = device id) and speaks the
agent's side of docs/protocol.md: a retained will/birth on `state`, a retained
`reported`, periodic `telemetry` in the agent's shape (per model `ok`, `errors`,
`latency_ms` percentiles, host health), `events` for deploys, and it applies `desired`
manifests: after a short simulated install each model serves, except a model named by
`--fail NAME` or `--fail NAME:VERSION`, which is reported `failed` (the previous version
of that name keeps serving, as on a real agent, and the applied revision stays).

Light on purpose: no models are downloaded or run. All clients of a group share one
network thread that multiplexes their sockets with `selectors` (paho's `loop_read`,
`loop_write`, `loop_misc` and its socket callbacks), so a thousand devices need one
thread and a few tens of MB, not a thousand threads. Everything a device does (publish,
timers, installs) happens on its group's thread; `--threads N` splits the devices over N
groups.

For load and integration tests of the controller, rollouts and the broker, never against
a broker whose ACL ties each identity to one device (all simulated devices share one
identity: the `--username`/TLS options given).
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import itertools
import json
import logging
import math
import random
import selectors
import signal
import ssl
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import FrameType
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgeinfer.cliargs import UsageError, duration, parse_duration
from edgeinfer.contract.brokerurl import DEFAULT_BROKER_URL, BrokerAddress, parse_broker_url
from edgeinfer.contract.topics import DEFAULT_PREFIX, DEVICE_ID_RE, Topics
from edgeinfer.contract.transport import TransportSecurity
from edgeinfer.fleet.cli import _prefix
from edgeinfer.fleet.tls_options import security_from_args

log = logging.getLogger(__name__)

SIM_AGENT_VERSION = "0.1.0+sim"
_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
_CPUS = ("ARM Cortex-A72", "ARM Cortex-A78AE", "Intel(R) Celeron(R) J4125 CPU @ 2.00GHz",
         "Intel(R) Core(TM) i5-1145G7E @ 2.60GHz", "Intel(R) Atom(TM) x6425E @ 2.00GHz")


@dataclass
class SimConfig:
    devices: int = 10
    broker_url: str = DEFAULT_BROKER_URL
    prefix: str = DEFAULT_PREFIX
    id_prefix: str = "sim-"
    report_every_s: float = 10.0
    # Each install takes uniformly between these (seconds).
    install_delay_s: tuple[float, float] = (0.5, 1.5)
    # "name" (every version) or "name:version": installs of these fail.
    fail: frozenset[str] = frozenset()
    jobs_per_s: float = 1.0  # simulated job rate per serving model, in telemetry
    error_rate: float = 0.0  # share of those jobs that fail
    connect_rate: float = 500.0  # new connections per second (per thread)
    keepalive_s: int = 60
    threads: int = 1
    seed: int | None = None
    security: TransportSecurity | None = None

    def device_ids(self) -> list[str]:
        width = max(4, len(str(self.devices - 1)))
        ids = [f"{self.id_prefix}{i:0{width}d}" for i in range(self.devices)]
        for dev in ids[:1] + ids[-1:]:
            if not DEVICE_ID_RE.match(dev):
                raise ValueError(f"device id {dev!r} (from --id-prefix {self.id_prefix!r}) must "
                                 f"match {DEVICE_ID_RE.pattern}")
        return ids

    def fails(self, name: str, version: str) -> bool:
        return name in self.fail or f"{name}:{version}" in self.fail


@dataclass
class SimStats:
    """Counters over every device (written by the network threads; read anywhere)."""

    connected: int = 0
    connects: int = 0
    disconnects: int = 0
    telemetry_sent: int = 0
    manifests: int = 0
    installs_ok: int = 0
    installs_failed: int = 0

    def line(self, total: int) -> str:
        return (f"{self.connected}/{total} connected, {self.telemetry_sent} telemetry sent, "
                f"{self.manifests} manifests, {self.installs_ok} installs ok, "
                f"{self.installs_failed} failed, {self.disconnects} disconnects")


def _now_iso() -> str:
    # Milliseconds: the controller and the rollout engine tell reports apart by this stamp.
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class _ModelCounters:
    ok: int = 0
    errors: int = 0
    base_ms: float = 5.0


@dataclass
class _Install:
    generation: int
    revision: int
    models: list[dict[str, Any]]


@dataclass
class SimDevice:
    """One simulated agent; every method runs on its group's network thread."""

    device_id: str
    topics: Topics
    group: _Group
    client: paho.Client
    hardware: dict[str, Any]
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started_at: str = field(default_factory=_now_iso)
    connected: bool = False
    attempt: int = 0
    applied_revision: int | None = None
    last_error: str | None = None
    # (name, version) -> the reported entry; serving ones and the latest failures.
    statuses: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    counters: dict[str, _ModelCounters] = field(default_factory=dict)
    generation: int = 0  # bumped per manifest: a newer one supersedes an install under way
    last_manifest: bytes = b""
    jobs_ok: int = 0
    jobs_failed: int = 0

    @property
    def cfg(self) -> SimConfig:
        return self.group.cfg

    # -- messages ---------------------------------------------------------------------

    def state_payload(self, state: str) -> bytes:
        return json.dumps({"state": state, "agent_version": SIM_AGENT_VERSION,
                           "session_id": self.session_id, "started_at": self.started_at}).encode()

    def reported(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "agent_version": SIM_AGENT_VERSION,
                "revision": self.applied_revision, "models": list(self.statuses.values()),
                "last_error": self.last_error, "hardware": self.hardware,
                "updated_at": _now_iso()}

    def publish(self, topic: str, doc: dict[str, Any] | bytes, *, qos: int = 1,
                retain: bool = False) -> None:
        if not self.connected:
            return  # reconnecting publishes state and reported afresh
        payload = doc if isinstance(doc, bytes) else json.dumps(doc, separators=(",", ":")).encode()
        self.client.publish(topic, payload, qos=qos, retain=retain)

    def publish_reported(self) -> None:
        self.publish(self.topics.reported, self.reported(), retain=True)

    def event(self, kind: str, **fields: Any) -> None:
        doc = {"ts": _now_iso(), "type": kind, "device_id": self.device_id}
        doc.update({k: v for k, v in fields.items() if v is not None})
        self.publish(self.topics.events, doc)

    def telemetry(self) -> dict[str, Any]:
        rng = self.group.rng
        dt = self.cfg.report_every_s
        models: dict[str, Any] = {}
        for (name, version), entry in self.statuses.items():
            if entry.get("state") != "serving":
                continue
            key = f"{name}:{version}"
            c = self.counters.setdefault(key, _ModelCounters(base_ms=_base_latency(name, rng)))
            jobs = _poisson(rng, self.cfg.jobs_per_s * dt)
            errors = sum(1 for _ in range(jobs) if rng.random() < self.cfg.error_rate)
            c.ok += jobs - errors
            c.errors += errors
            self.jobs_ok += jobs - errors
            self.jobs_failed += errors
            infer = c.base_ms * rng.uniform(0.9, 1.1)
            queue = infer * rng.uniform(0.05, 0.3)
            models[key] = {
                "ok": c.ok,
                "errors": {"INTERNAL": c.errors} if c.errors else {},
                "latency_ms": _percentiles(infer + queue),
                "infer_ms": _percentiles(infer),
                "queue_ms": _percentiles(queue),
            }
        return {
            "ts": time.time(),
            "health": {
                "cpu_percent": round(rng.uniform(3, 40), 1),
                "load_avg": [round(rng.uniform(0.1, 2.0), 2) for _ in range(3)],
                "memory": {"total": self.hardware["memory_mb"] << 20,
                           "available": int((self.hardware["memory_mb"] << 20) * 0.6),
                           "percent": round(rng.uniform(20, 60), 1)},
                "disk": {"total": 32 << 30, "free": 20 << 30, "percent": 37.5},
                "process": {"rss": 180 << 20, "threads": 14},
            },
            "queue_depth": 0,
            "inference": {"jobs_ok": self.jobs_ok, "jobs_failed": self.jobs_failed,
                          "errors_by_code": {"INTERNAL": self.jobs_failed}
                          if self.jobs_failed else {},
                          "models": models},
            "durability": {},
        }

    # -- desired state ----------------------------------------------------------------

    def on_desired(self, payload: bytes) -> None:
        if not payload or payload == self.last_manifest:
            return  # a deletion, or the same manifest again (a resubscribe)
        self.last_manifest = payload
        self.group.stats.manifests += 1
        try:
            doc = json.loads(payload)
            revision = int(doc["revision"])
            models = [m for m in doc.get("models") or [] if isinstance(m, dict)]
            for m in models:
                m["name"], m["version"] = str(m["name"]), str(m["version"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self.refuse(None, "invalid", f"cannot read the manifest: {exc}")
            return
        if self.applied_revision is not None and revision < self.applied_revision:
            self.refuse(revision, "rollback",
                        f"revision {revision} is lower than the applied {self.applied_revision}")
            return
        self.generation += 1
        self.event("deploy_started", revision=revision)
        for m in models:
            key = (m["name"], m["version"])
            current = self.statuses.get(key)
            if current is None or current.get("state") != "serving" \
                    or current.get("sha256") != m.get("sha256"):
                self.statuses[key] = _entry(m, "loading")
        self.publish_reported()
        lo, hi = self.cfg.install_delay_s
        job = _Install(self.generation, revision, models)
        self.group.after(self.group.rng.uniform(lo, hi), lambda: self.finish(job))

    def refuse(self, revision: int | None, reason: str, message: str) -> None:
        self.last_error = f"manifest revision {revision} refused ({reason}): {message}"
        self.event("manifest_rejected", reason=reason, message=message, revision=revision)
        self.publish_reported()

    def finish(self, job: _Install) -> None:
        if job.generation != self.generation:
            return  # a newer manifest came meanwhile: it decides
        statuses: dict[tuple[str, str], dict[str, Any]] = {}
        failures: list[str] = []
        loaded: set[str] = set()
        for m in job.models:
            key = (m["name"], m["version"])
            old = self.statuses.get(key)
            if old is not None and old.get("state") == "serving" \
                    and old.get("sha256") == m.get("sha256"):
                statuses[key] = old
                loaded.add(key[0])
            elif self.cfg.fails(*key):
                error = f"simulated failure: {key[0]}:{key[1]} is configured to fail"
                statuses[key] = _entry(m, "failed", error)
                failures.append(f"{key[0]}:{key[1]}: {error}")
                self.group.stats.installs_failed += 1
                self.event("model_failed", model=key[0], version=key[1], stage="load",
                           message=error)
            else:
                statuses[key] = _entry(m, "serving")
                loaded.add(key[0])
                self.group.stats.installs_ok += 1
                self.event("model_serving", model=key[0], version=key[1], runtime="onnxruntime",
                           device="CPU", precision="f32", autotune=None)
        # A name whose new versions all failed keeps serving what it served.
        wanted = {m["name"] for m in job.models}
        for key, entry in self.statuses.items():
            if entry.get("state") == "serving" and key[0] in wanted - loaded \
                    and key not in statuses:
                statuses[key] = entry
                self.event("kept_serving", model=key[0], version=key[1])
        for key, entry in self.statuses.items():
            if entry.get("state") == "serving" and key not in statuses:
                self.event("model_unloaded", model=key[0], version=key[1])
        self.statuses = statuses
        if failures:
            self.last_error = "; ".join(failures)
            self.event("deploy_failed", revision=job.revision)
        else:
            self.applied_revision = job.revision
            self.last_error = None
            self.event("deploy_finished", revision=job.revision)
        self.publish_reported()


def _entry(m: dict[str, Any], state: str, error: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": m["name"], "version": m["version"], "sha256": m.get("sha256"), "state": state,
        "runtime": "onnxruntime" if state != "loading" else None,
        "device": "CPU" if state != "loading" else None, "error": error,
        "attempts": [] if state == "loading" else
        [{"runtime": "onnxruntime", "device": "CPU", "ok": state == "serving", "reason": error}],
    }
    if state == "serving":
        entry.update({"precision": "f32", "candidates": [], "autotune": None, "failovers": []})
    return entry


def _base_latency(name: str, rng: random.Random) -> float:
    """A plausible per-model latency (ms): stable per model name, a little per device."""
    per_model = 2.0 + (zlib.crc32(name.encode()) % 400) / 10.0  # 2..42 ms
    return per_model * rng.uniform(0.8, 1.25)


def _percentiles(median: float) -> dict[str, float]:
    return {"p50": round(median, 3), "p95": round(median * 1.6, 3), "p99": round(median * 2.2, 3)}


def _poisson(rng: random.Random, mean: float) -> int:
    if mean <= 0:
        return 0
    if mean > 50:
        return max(0, round(rng.gauss(mean, math.sqrt(mean))))
    limit, k, p = math.exp(-mean), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def _hardware(rng: random.Random) -> dict[str, Any]:
    cores = rng.choice((2, 4, 4, 8))
    return {
        "cpu": {"model": rng.choice(_CPUS), "cores_physical": cores, "cores_logical": cores,
                "flags": []},
        "memory_mb": rng.choice((2048, 4096, 8192)),
        "nvidia_gpus": [],
        "onnxruntime": {"version": "1.20.0", "providers": ["CPUExecutionProvider"]},
        "openvino": {"version": "2024.6.0", "devices": {"CPU": "simulated CPU"}},
        "errors": [],
    }


class _Group:
    """Devices sharing one network thread: a selector over their sockets and a timer heap."""

    def __init__(self, index: int, cfg: SimConfig, address: BrokerAddress, ids: list[str],
                 stats: SimStats, ssl_context: ssl.SSLContext | None) -> None:
        self.cfg = cfg
        self.address = address
        self.stats = stats
        # Simulated figures, not secrets.
        self.rng = random.Random(None if cfg.seed is None else cfg.seed + index)  # noqa: S311
        self.sel = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._stop = threading.Event()
        self._stopping = False
        self.devices = [self._device(dev, ssl_context) for dev in ids]
        self.thread = threading.Thread(target=self._run, name=f"sim-net-{index}", daemon=True)

    def _device(self, device_id: str, ssl_context: ssl.SSLContext | None) -> SimDevice:
        client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=device_id, protocol=paho.MQTTv5)
        d = SimDevice(device_id, Topics(self.cfg.prefix, device_id), self, client,
                      _hardware(self.rng))
        if ssl_context is not None:
            client.tls_set_context(ssl_context)
        security = self.cfg.security
        if security is not None and security.username is not None:
            client.username_pw_set(security.username, security.password.reveal()
                                   if security.password is not None else None)
        client.will_set(d.topics.state, d.state_payload("offline"), qos=1, retain=True)
        client.user_data_set(d)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        return d

    # -- timers -----------------------------------------------------------------------

    def after(self, delay_s: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay_s, next(self._seq), fn))

    # -- socket callbacks (keep the selector in step with paho) -------------------------

    def _on_socket_open(self, _c: paho.Client, d: SimDevice, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(sock)
        self.sel.register(sock, _READ, d)

    def _on_socket_close(self, _c: paho.Client, _d: SimDevice, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(sock)

    def _on_register_write(self, _c: paho.Client, d: SimDevice, sock: Any) -> None:
        try:
            self.sel.modify(sock, _READ | _WRITE, d)
        except KeyError:
            self.sel.register(sock, _READ | _WRITE, d)

    def _on_unregister_write(self, _c: paho.Client, d: SimDevice, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.modify(sock, _READ, d)

    # -- MQTT callbacks -----------------------------------------------------------------

    def _on_connect(self, client: paho.Client, d: SimDevice, _flags: paho.ConnectFlags,
                    reason_code: ReasonCode, _props: Properties | None) -> None:
        if reason_code.is_failure:
            log.warning("broker refused %s: %s", d.device_id, reason_code)
            return
        d.connected, d.attempt = True, 0
        self.stats.connected += 1
        self.stats.connects += 1
        client.subscribe(d.topics.desired, qos=1)
        d.publish(d.topics.state, d.state_payload("online"), retain=True)
        d.publish_reported()

    def _on_disconnect(self, _client: paho.Client, d: SimDevice, _flags: paho.DisconnectFlags,
                       reason_code: ReasonCode, _props: Properties | None) -> None:
        if d.connected:
            self.stats.connected -= 1
            self.stats.disconnects += 1
        d.connected = False
        if not self._stopping:
            log.info("%s lost the broker: %s", d.device_id, reason_code)
            self._schedule_connect(d)

    def _on_message(self, _client: paho.Client, d: SimDevice, msg: paho.MQTTMessage) -> None:
        if msg.topic == d.topics.desired:
            d.on_desired(bytes(msg.payload))

    # -- connecting ---------------------------------------------------------------------

    def _schedule_connect(self, d: SimDevice) -> None:
        d.attempt += 1
        delay = self.rng.uniform(0, min(30.0, 0.5 * 2 ** min(d.attempt, 6)))
        self.after(delay, lambda: self._connect(d))

    def _connect(self, d: SimDevice) -> None:
        if self._stopping or d.connected:
            return
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 0
        try:
            d.client.connect(self.address.host, self.address.port, self.cfg.keepalive_s,
                             clean_start=True, properties=props)
        except (OSError, ssl.SSLError) as exc:
            log.info("%s cannot connect to %s: %s", d.device_id, self.address, exc)
            self._schedule_connect(d)

    def _telemetry(self, d: SimDevice) -> None:
        if self._stopping:
            return
        doc = d.telemetry()
        if d.connected:
            d.publish(d.topics.telemetry, doc, qos=0)
            self.stats.telemetry_sent += 1
        self.after(self.cfg.report_every_s, lambda: self._telemetry(d))

    # -- the loop -----------------------------------------------------------------------

    def start(self) -> None:
        spacing = 1.0 / self.cfg.connect_rate if self.cfg.connect_rate > 0 else 0.0
        for i, d in enumerate(self.devices):
            self.after(i * spacing, lambda d=d: self._connect(d))  # type: ignore[misc]
            self.after(i * spacing + self.rng.uniform(0, self.cfg.report_every_s),
                       lambda d=d: self._telemetry(d))  # type: ignore[misc]
        self.after(1.0, self._misc)
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _misc(self) -> None:
        for d in self.devices:
            if d.client.socket() is not None:
                d.client.loop_misc()
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
            d: SimDevice = key.data
            client = d.client
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
            self._shutdown()
        except Exception:
            log.exception("simulator network thread failed")
        finally:
            self.sel.close()

    def _shutdown(self) -> None:
        """Say `offline` (retained, as an agent that stops does) and disconnect cleanly."""
        self._stopping = True
        for d in self.devices:
            if d.connected:
                d.publish(d.topics.state, d.state_payload("offline"), retain=True)
                d.client.disconnect()
            elif d.client.socket() is not None:
                d.client.disconnect()
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(d.client.socket() is not None
                                                  for d in self.devices):
            self._poll(0.05)


class Simulator:
    """N simulated devices in this process: `start()`, then `stop()` (or a `with` block)."""

    def __init__(self, cfg: SimConfig) -> None:
        if cfg.devices < 1:
            raise ValueError("--devices must be at least 1")
        if cfg.report_every_s <= 0:
            raise ValueError("--report-every must be positive")
        self.cfg = cfg
        self.address = parse_broker_url(cfg.broker_url)
        self.stats = SimStats()
        ids = cfg.device_ids()
        ctx = None
        if self.address.tls:
            ctx = (cfg.security or TransportSecurity()).ssl_context()
        threads = max(1, min(cfg.threads, len(ids)))
        self.groups = [_Group(i, cfg, self.address, ids[i::threads], self.stats, ctx)
                       for i in range(threads)]

    @property
    def device_ids(self) -> list[str]:
        return sorted(d.device_id for g in self.groups for d in g.devices)

    def start(self) -> Simulator:
        for g in self.groups:
            g.start()
        return self

    def wait_connected(self, timeout_s: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.stats.connected < self.cfg.devices:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> None:
        for g in self.groups:
            g.stop()
        for g in self.groups:
            if g.thread.is_alive():
                g.thread.join(15)

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


# -- the command ------------------------------------------------------------------------


def add_simulate_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "simulate", parents=[common], help="run many simulated devices (load and rollout tests)",
        description="Run N simulated agents in this process, each its own MQTT client: "
                    "state (birth and will), retained reported, periodic telemetry, and "
                    "desired manifests applied after a short simulated install. No model is "
                    "downloaded or run.",
    )
    p.add_argument("--devices", type=int, required=True, metavar="N", help="how many devices")
    p.add_argument("--id-prefix", default="sim-", metavar="TEXT",
                   help="device ids are TEXT0000, TEXT0001, ... (default: sim-)")
    p.add_argument("--report-every", type=duration, default="10s", metavar="DURATION",
                   help="telemetry period per device (default: 10s)")
    p.add_argument("--duration", type=duration, default=None, metavar="DURATION",
                   help="stop after this long (default: until Ctrl-C or SIGTERM)")
    p.add_argument("--install-delay", default="0.5s-1.5s", metavar="MIN[-MAX]",
                   help="how long a simulated install takes (default: 0.5s-1.5s)")
    p.add_argument("--fail", action="append", default=[], metavar="NAME[:VERSION]",
                   help="installs of this model (or version) fail (repeatable)")
    p.add_argument("--jobs-per-s", type=float, default=1.0, metavar="R",
                   help="simulated jobs per second per serving model, as telemetry counts "
                        "them (default: 1)")
    p.add_argument("--error-rate", type=float, default=0.0, metavar="F",
                   help="share of those jobs that fail, 0..1 (default: 0)")
    p.add_argument("--connect-rate", type=float, default=500.0, metavar="R",
                   help="new connections per second per thread (default: 500)")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="network threads the devices are spread over (default: 1)")
    p.add_argument("--seed", type=int, default=None, help="random seed (repeatable runs)")
    p.set_defaults(func=cmd_simulate)


def _delay_range(text: str) -> tuple[float, float]:
    lo_text, _, hi_text = text.partition("-")
    lo = parse_duration(lo_text, "--install-delay")
    hi = parse_duration(hi_text, "--install-delay") if hi_text else lo
    if hi < lo:
        lo, hi = hi, lo
    return lo, hi


def cmd_simulate(args: argparse.Namespace) -> int:
    report_s, stop_after_s = args.report_every, args.duration
    if report_s <= 0:
        raise UsageError("--report-every must be positive")
    try:
        delays = _delay_range(args.install_delay)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not 0 <= args.error_rate <= 1:
        raise UsageError("--error-rate must lie between 0 and 1")
    cfg = SimConfig(devices=args.devices, broker_url=args.broker, prefix=_prefix(args),
                    id_prefix=args.id_prefix, report_every_s=report_s, install_delay_s=delays,
                    fail=frozenset(args.fail), jobs_per_s=args.jobs_per_s,
                    error_rate=args.error_rate, connect_rate=args.connect_rate,
                    threads=args.threads, seed=args.seed, security=security_from_args(args))
    try:
        sim = Simulator(cfg)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    ids = sim.device_ids
    print(f"simulating {cfg.devices} devices ({ids[0]} .. {ids[-1]}) on {sim.address}, "
          f"telemetry every {report_s:g}s (Ctrl-C to stop)", flush=True)
    started = time.monotonic()
    sim.start()
    try:
        while not stop.is_set():
            left = None if stop_after_s is None else stop_after_s - (time.monotonic() - started)
            if left is not None and left <= 0:
                break
            stop.wait(min(report_s, left) if left is not None else report_s)
            print(sim.stats.line(cfg.devices), flush=True)
    finally:
        sim.stop()
        for s, handler in old.items():
            signal.signal(s, handler)
    print(f"stopped after {time.monotonic() - started:.1f}s: {sim.stats.line(cfg.devices)}")
    return 0
