"""The controller's HTTP side: the artifact store (ETag, Range) plus a small read-only JSON API.

    GET /                                         the dashboard (fleet/dashboard.py)
    GET /api/devices[?selector=site=berlin,gpu]   {"devices": [Device, ...]}
                   [&health=1]                    ... each with "health" from last telemetry
    GET /api/devices/<id>                         Device + {"telemetry": {...} | null}
    GET /api/models[?name=N]                      {"models": [ModelVersion, ...]}
    GET /api/events[?device=D&type=T&limit=N]     {"events": [Event, ...]} newest first
    GET /api/rollouts[?status=S]                  {"rollouts": [...]} newest first, with waves
    GET /api/status                               the controller's MQTT session and counters

Errors are JSON too: `{"error": "<what to fix>"}` with 400 or 404.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from edgeinfer.contract.topics import DEVICE_ID_RE
from edgeinfer.fleet import dashboard
from edgeinfer.fleet.artifacts import ArtifactHandler, ArtifactServer, ArtifactStore
from edgeinfer.fleet.registry import Registry, RegistryError, RegistryUnavailable, parse_selector

MAX_EVENTS_PAGE = 1000


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class ControllerHandler(ArtifactHandler):
    server: ControllerServer
    server_version = "edgeinfer-controller"

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path.startswith("/api/"):
            self._api(send_body=True)
        elif path in dashboard.PAGE_PATHS:
            dashboard.send_page(self, send_body=True)
        else:
            super().do_GET()

    def do_HEAD(self) -> None:
        path = urlsplit(self.path).path
        if path.startswith("/api/"):
            self._api(send_body=False)
        elif path in dashboard.PAGE_PATHS:
            dashboard.send_page(self, send_body=False)
        else:
            super().do_HEAD()

    def _api(self, *, send_body: bool) -> None:
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        try:
            status, doc = HTTPStatus.OK, self.server.api.get(parts.path, query)
        except ApiError as exc:
            status, doc = exc.status, {"error": str(exc)}
        except RegistryUnavailable as exc:
            status, doc = HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)}
        body = json.dumps(doc, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if send_body:
            self.wfile.write(body)


class Api:
    """Routes of the JSON API; no HTTP here, so it is tested directly too."""

    def __init__(self, registry: Registry,
                 status: Callable[[], dict[str, Any]] | None = None) -> None:
        self.registry = registry
        self._status = status
        self._rollouts = dashboard.RolloutsView(registry)
        self._routes: dict[str, Callable[[dict[str, str]], Any]] = {
            "/api/devices": self.devices,
            "/api/models": self.models,
            "/api/events": self.events,
            "/api/rollouts": self.rollouts,
            "/api/status": self.status,
        }

    def get(self, path: str, query: dict[str, str]) -> Any:
        route = self._routes.get(path.rstrip("/") or path)
        if route is not None:
            return route(query)
        head = "/api/devices/"
        if path.startswith(head) and DEVICE_ID_RE.match(path[len(head):]):
            return self.device(path[len(head):])
        raise ApiError(HTTPStatus.NOT_FOUND, f"no such API path: {path}")

    def devices(self, query: dict[str, str]) -> dict[str, Any]:
        try:
            selector = parse_selector(query["selector"]) if query.get("selector") else None
        except RegistryError as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, str(exc)) from None
        found = [d.as_json() for d in self.registry.devices(selector)]
        if query.get("health") not in (None, "", "0"):
            health = dashboard.device_health(self.registry, [d["device_id"] for d in found])
            for d in found:
                d["health"] = health.get(d["device_id"])
        return {"devices": found}

    def device(self, device_id: str) -> dict[str, Any]:
        found = self.registry.device(device_id)
        if found is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no device {device_id}")
        telemetry = self.registry.telemetry(device_id)
        return {**found.as_json(), "telemetry": telemetry.as_json() if telemetry else None}

    def models(self, query: dict[str, str]) -> dict[str, Any]:
        return {"models": [m.as_json() for m in self.registry.models(query.get("name") or None)]}

    def events(self, query: dict[str, str]) -> dict[str, Any]:
        raw = query.get("limit", "100")
        try:
            limit = int(raw)
        except ValueError:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"limit {raw!r} is not a number") from None
        if not 1 <= limit <= MAX_EVENTS_PAGE:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"limit must be 1..{MAX_EVENTS_PAGE}")
        found = self.registry.events(query.get("device") or None, query.get("type") or None,
                                     limit)
        return {"events": [e.as_json() for e in found]}

    def rollouts(self, query: dict[str, str]) -> dict[str, Any]:
        return self._rollouts.document(query.get("status") or None)

    def status(self, _query: dict[str, str]) -> dict[str, Any]:
        return self._status() if self._status is not None else {"registry": self.registry.url}


class ControllerServer(ArtifactServer):
    """Artifacts under /artifacts/sha256/<hex>, the JSON API under /api/."""

    handler_class = ControllerHandler

    def __init__(self, store: ArtifactStore, api: Api, host: str, port: int) -> None:
        self.api = api
        super().__init__(store, host, port)
