"""The controller's web page (`GET /`) and the API documents only it needs.

The page is one HTML file (`fleet/static/dashboard.html`: plain JS and CSS, no build step,
nothing from a CDN) that polls the JSON API every 1.5 s:

    GET /api/devices?health=1   devices, each with "health" from its last telemetry
    GET /api/rollouts           rollouts with their devices and waves
    GET /api/events?limit=50    recent events
    GET /api/status             the controller's MQTT session

Everything a device sends (ids, error texts, model names, event fields) reaches the page
as JSON and is put into the document as text nodes only, never parsed as HTML. The page is
served with a Content-Security-Policy that allows only its own inline script and style
(by hash) and requests to this server, so even a mistake there could not run injected
script.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
import time
from dataclasses import dataclass
from http import HTTPStatus
from importlib import resources
from typing import Any

from edgeinfer.fleet.registry import Registry, RegistryError, SqlRegistry, parse_selector
from edgeinfer.fleet.rollout import (
    BAKING,
    COMPLETED,
    FAILED,
    PENDING,
    RUNNING,
    SERVING,
    RolloutError,
    RolloutStore,
    parse_amount,
)

PAGE_PATHS = frozenset({"/", "/index.html", "/dashboard"})
MAX_ROLLOUTS = 50


@dataclass(frozen=True)
class Page:
    body: bytes
    csp: str
    etag: str


def _csp_hash(text: str) -> str:
    digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
    return f"'sha256-{digest}'"


@functools.lru_cache(maxsize=1)
def page() -> Page:
    """The dashboard's HTML (package data) and the CSP that admits exactly its inline parts."""
    text = resources.files("fleet").joinpath("static/dashboard.html").read_text("utf-8")
    scripts = re.findall(r"<script>(.*?)</script>", text, re.DOTALL)
    styles = re.findall(r"<style>(.*?)</style>", text, re.DOTALL)
    csp = "; ".join([
        "default-src 'none'",
        "script-src " + (" ".join(_csp_hash(s) for s in scripts) or "'none'"),
        "style-src " + (" ".join(_csp_hash(s) for s in styles) or "'none'"),
        "connect-src 'self'",
        "img-src 'self' data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ])
    body = text.encode()
    return Page(body, csp, f'"{hashlib.sha256(body).hexdigest()[:32]}"')


def send_page(handler: Any, *, send_body: bool) -> None:
    """Answer a GET/HEAD of the page on a BaseHTTPRequestHandler."""
    p = page()
    if handler.headers.get("If-None-Match") == p.etag:
        handler.send_response(HTTPStatus.NOT_MODIFIED)
        handler.send_header("ETag", p.etag)
        handler.end_headers()
        return
    handler.send_response(HTTPStatus.OK)
    handler.send_header("Content-Type", "text/html; charset=utf-8")
    handler.send_header("Content-Length", str(len(p.body)))
    handler.send_header("Content-Security-Policy", p.csp)
    handler.send_header("X-Content-Type-Options", "nosniff")
    handler.send_header("Referrer-Policy", "no-referrer")
    handler.send_header("Cache-Control", "no-cache")
    handler.send_header("ETag", p.etag)
    handler.end_headers()
    if send_body:
        handler.wfile.write(p.body)


# -- health from telemetry ----------------------------------------------------------------


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _count(value: Any) -> int | None:
    """A count, or (what agents send for errors) a count per code summed."""
    if isinstance(value, dict):
        parts = [_count(v) for v in value.values()]
        return sum(p for p in parts if p is not None)
    number = _number(value)
    return None if number is None else int(number)


def health_summary(body: Any, received_at: str | None) -> dict[str, Any]:
    """What the page shows from a telemetry document (any shape tolerated)."""
    doc = _obj(body)
    inference, host = _obj(doc.get("inference")), _obj(doc.get("health"))
    models: dict[str, Any] = {}
    raw_models = inference.get("models")
    if isinstance(raw_models, dict):
        for key, entry in raw_models.items():
            if not isinstance(entry, dict):
                continue
            lat = _obj(entry.get("latency_ms"))
            models[str(key)] = {
                "ok": _count(entry.get("ok")),
                "errors": _count(entry.get("errors")),
                "p50_ms": _number(lat.get("p50")),
                "p95_ms": _number(lat.get("p95")),
                "p99_ms": _number(lat.get("p99")),
            }
    by_code = inference.get("errors_by_code")
    return {
        "received_at": received_at,
        "ts": doc.get("ts") if isinstance(doc.get("ts"), str) else None,
        "queue_depth": _count(doc.get("queue_depth")),
        "jobs_ok": _count(inference.get("jobs_ok")),
        "jobs_failed": _count(inference.get("jobs_failed")),
        "errors_by_code": {str(k): _count(v) for k, v in by_code.items()}
        if isinstance(by_code, dict) else {},
        "cpu_percent": _number(host.get("cpu_percent")),
        "models": models,
    }


def device_health(registry: Registry, device_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The health summary of each device's last telemetry (devices without any are left out)."""
    return {dev: health_summary(t.body, t.received_at)
            for dev, t in registry.telemetry_by_device(device_ids).items()}


# -- rollouts -------------------------------------------------------------------------------


class RolloutsView:
    """`GET /api/rollouts` from the rollout store's tables (created on first use)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._store: RolloutStore | None = None

    def _rollout_store(self) -> RolloutStore | None:
        # Rollouts live in the SQL registry's database; any other registry has none.
        if self._store is None and isinstance(self.registry, SqlRegistry):
            self._store = RolloutStore(self.registry)
        return self._store

    def document(self, status: str | None = None, limit: int = MAX_ROLLOUTS,
                 now: float | None = None) -> dict[str, Any]:
        """Newest first: each rollout's row, its devices, group size and one entry per wave."""
        store = self._rollout_store()
        if store is None:
            return {"rollouts": []}
        moment = time.time() if now is None else now
        rollouts = store.all([status] if status else None)[::-1][:limit]
        all_devices = self.registry.devices() if rollouts else []
        out = []
        for r in rollouts:
            devices = store.devices(r.id)
            touched = {d.device_id for d in devices}
            try:
                selector = parse_selector(r.selector)
                group = [d for d in all_devices
                         if selector.matches(d.labels) and (d.online or d.device_id in touched)]
            except RegistryError:
                group = []
            waves = []
            for i, amount in enumerate(r.waves):
                members = [d for d in devices if d.wave == i]
                try:
                    target: int | None = parse_amount(amount, "wave").of(len(group))
                except RolloutError:  # a row written by a newer version
                    target = None
                waves.append({
                    "index": i,
                    "amount": amount,
                    "target": target,
                    "current": i == r.wave,
                    "done": i < r.wave or (i == r.wave and r.status == COMPLETED),
                    "devices": [d.device_id for d in members],
                    "serving": sum(1 for d in members if d.state == SERVING and not d.reverted),
                    "pending": sum(1 for d in members if d.state == PENDING and not d.reverted),
                    "failed": sum(1 for d in members if d.state == FAILED),
                })
            doc = r.as_json()
            doc.pop("spec", None)  # the manifest entry: long, and not what an operator reads
            bake_left = None
            if r.status == RUNNING and r.phase == BAKING and r.bake_until is not None:
                bake_left = max(r.bake_until - moment, 0.0)
            out.append({
                **doc,
                "target": r.target,
                "group_size": len(group),
                "bake_left_s": bake_left,
                "waves_detail": waves,
                "devices": [{
                    "device_id": d.device_id, "wave": d.wave, "state": d.state,
                    "error": d.error, "reverted": d.reverted, "updated_at": d.updated_at,
                } for d in devices],
            })
        return {"rollouts": out}
