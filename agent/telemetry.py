"""Periodic health and inference figures: published over MQTT (the `telemetry` document of
edgeinfer.contract.telemetry), optionally served to Prometheus."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import psutil
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from edgeinfer.agent.metrics import Metrics
from edgeinfer.contract.telemetry import (
    DiskFigures,
    Durability,
    Health,
    Inference,
    MemoryFigures,
    ProcessFigures,
    Telemetry,
)

log = logging.getLogger(__name__)


def host_health(state_dir: Path) -> Health:
    """The host now; `temperatures_c` only where it has sensors."""
    vm = psutil.virtual_memory()
    disk = psutil.disk_usage(str(state_dir))
    proc = psutil.Process()
    temps = _temperatures()
    return Health(
        cpu_percent=psutil.cpu_percent(interval=None),
        load_avg=list(psutil.getloadavg()),
        memory=MemoryFigures(total=vm.total, available=vm.available, percent=vm.percent),
        disk=DiskFigures(total=disk.total, free=disk.free, percent=disk.percent),
        process=ProcessFigures(rss=proc.memory_info().rss, threads=proc.num_threads()),
        temperatures_c=temps if temps else msgspec.UNSET,
    )


def _temperatures() -> dict[str, float]:
    reader = getattr(psutil, "sensors_temperatures", None)
    if reader is None:
        return {}
    try:
        sensors = reader()
    except (OSError, RuntimeError):
        return {}
    out: dict[str, float] = {}
    for chip, entries in sensors.items():
        for i, entry in enumerate(entries):
            label = entry.label or f"{chip}{i}"
            out[f"{chip}/{label}"] = float(entry.current)
    return out


class TelemetryLoop:
    """Every `interval_s`, build one telemetry document and hand it to `publish`."""

    def __init__(
        self,
        interval_s: float,
        state_dir: Path,
        metrics: Metrics,
        queue_depth: Callable[[], int],
        publish: Callable[[Telemetry], None],
        durability: Callable[[], Durability],
    ) -> None:
        self._durability = durability
        self._interval = interval_s
        self._state_dir = state_dir
        self._metrics = metrics
        self._queue_depth = queue_depth
        self._publish = publish
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def document(self) -> Telemetry:
        return Telemetry(
            ts=time.time(),
            health=host_health(self._state_dir),
            queue_depth=self._queue_depth(),
            # Metrics keeps its snapshot as plain data (Prometheus reads it too).
            inference=msgspec.convert(self._metrics.snapshot(), Inference),
            durability=self._durability(),
        )

    def start(self) -> None:
        psutil.cpu_percent(interval=None)  # prime: the first call always says 0.0
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def set_interval(self, interval_s: float) -> None:
        """Takes effect from the next document (a config reload)."""
        self._interval = interval_s

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._publish(self.document())
            except Exception:
                log.exception("telemetry failed")


def start_prometheus(
    port: int, metrics: Metrics, queue_depth: Callable[[], int], state_dir: Path
) -> Callable[[], None]:
    """Serve the same figures on 127.0.0.1:`port`/metrics; returns a stop function."""
    class _Collector(Collector):
        def collect(self) -> Iterator[Any]:
            snap = metrics.snapshot()
            jobs = CounterMetricFamily("edge_jobs", "Jobs answered", labels=["model", "outcome"])
            latency = GaugeMetricFamily(
                "edge_job_latency_ms", "Job latency percentiles (recent window)",
                labels=["model", "quantile"],
            )
            for name, m in snap["models"].items():
                jobs.add_metric([name, "ok"], m["ok"])
                for code, n in m["errors"].items():
                    jobs.add_metric([name, code], n)
                for q, v in m["latency_ms"].items():
                    if v is not None:
                        latency.add_metric([name, q], v)
            yield jobs
            yield latency
            yield GaugeMetricFamily("edge_queue_depth", "Jobs waiting", value=queue_depth())
            health = host_health(state_dir)
            yield GaugeMetricFamily("edge_cpu_percent", "Host CPU use", value=health.cpu_percent)
            yield GaugeMetricFamily(
                "edge_memory_percent", "Host memory use", value=health.memory.percent
            )
            yield GaugeMetricFamily("edge_disk_free_bytes", "Free bytes on the state disk",
                                    value=health.disk.free)
            disk = snap["state_disk"]
            yield GaugeMetricFamily("edge_state_disk_full",
                                    "1 while the state disk refuses writes for lack of space",
                                    value=1 if disk["full"] else 0)
            yield CounterMetricFamily("edge_state_disk_full_episodes",
                                      "Times the state disk was found full",
                                      value=disk["full_episodes"])
            yield GaugeMetricFamily("edge_disk_held_jobs",
                                    "Jobs held unacknowledged while the state disk is full",
                                    value=disk["held_jobs"])
            yield GaugeMetricFamily("edge_disk_waiting_answers",
                                    "Answers waiting in memory for room on the state disk",
                                    value=disk["waiting_answers"])

    registry = CollectorRegistry()
    registry.register(_Collector())
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)

    def stop() -> None:
        server.shutdown()
        thread.join(5)

    return stop
