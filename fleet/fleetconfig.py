"""The fleet side's config file (`edge-fleet serve --config fleet.yaml`, `models`, `devices label`).

    broker: {url: mqtt://broker:1883, client_id: edge-fleet-controller}
    prefix: edge/v1
    state_dir: /var/lib/edge-fleet            # registry.sqlite3 lives here by default
    database: postgresql://fleet@db/fleet?schema=edge   # optional; else SQLite in state_dir
    artifact_dir: /var/lib/edge-fleet/artifacts
    http: {host: 0.0.0.0, port: 8780}
    events: {keep: 10000}

Every key has a default; an unknown or ill-typed key is an error naming the key and the
file. Command-line flags win over the file, the file over the defaults.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import yaml

from agent.brokerurl import DEFAULT_BROKER_URL
from agent.topics import DEFAULT_PREFIX, DEVICE_ID_RE
from fleet.artifacts import default_artifact_dir
from fleet.registry import DEFAULT_MAX_EVENTS

CONFIG_ENV = "EDGE_FLEET_CONFIG"
STATE_DIR_ENV = "EDGE_FLEET_STATE_DIR"
REGISTRY_FILE = "registry.sqlite3"


class ConfigError(ValueError):
    """The fleet config cannot be used; the message names the file and the key."""


class BrokerSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    url: str = DEFAULT_BROKER_URL
    # The controller keeps a persistent session under this id, so QoS 1 events sent
    # while it restarts wait in the broker. One controller per id.
    client_id: str = "edge-fleet-controller"
    session_expiry_s: int = 86_400
    keepalive_s: int = 30


class HttpSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8780


class EventsSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    keep: int = DEFAULT_MAX_EVENTS


class FleetConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    broker: BrokerSection = msgspec.field(default_factory=BrokerSection)
    prefix: str = DEFAULT_PREFIX
    state_dir: str | None = None
    database: str | None = None
    artifact_dir: str | None = None
    http: HttpSection = msgspec.field(default_factory=HttpSection)
    events: EventsSection = msgspec.field(default_factory=EventsSection)

    def state_path(self) -> Path:
        if self.state_dir:
            return Path(self.state_dir).expanduser()
        env = os.environ.get(STATE_DIR_ENV)
        if env:
            return Path(env).expanduser()
        return Path.home() / ".local" / "share" / "edgeinfer" / "fleet"

    def database_target(self) -> str:
        """The registry: the configured URL/path, else `<state_dir>/registry.sqlite3`."""
        return self.database or str(self.state_path() / REGISTRY_FILE)

    def artifact_path(self) -> Path:
        return Path(self.artifact_dir).expanduser() if self.artifact_dir else default_artifact_dir()


def _check(cfg: FleetConfig, where: str) -> None:
    if not DEVICE_ID_RE.match(cfg.broker.client_id):
        raise ConfigError(f"{where}: broker.client_id must match {DEVICE_ID_RE.pattern}")
    if cfg.broker.session_expiry_s < 0:
        raise ConfigError(f"{where}: broker.session_expiry_s must not be negative")
    if not 0 <= cfg.http.port <= 65535:
        raise ConfigError(f"{where}: http.port must be 0..65535")
    if cfg.events.keep < 1:
        raise ConfigError(f"{where}: events.keep must be at least 1")
    if not cfg.prefix.strip("/") or "+" in cfg.prefix or "#" in cfg.prefix:
        raise ConfigError(f"{where}: prefix {cfg.prefix!r} must be a topic without wildcards")


def load_fleet_config(path: Path | str | None) -> FleetConfig:
    """The file's config (defaults for what it leaves out); None: all defaults."""
    if path is None:
        cfg = FleetConfig()
        _check(cfg, "defaults")
        return cfg
    where = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {where}: {exc.strerror or exc}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not YAML: {exc}") from None
    if doc is None:
        doc = {}
    try:
        cfg = msgspec.convert(doc, FleetConfig)
    except msgspec.ValidationError as exc:
        # msgspec names the key path: "Object contains unknown field `x` - at `$.http`".
        raise ConfigError(f"{where}: {exc}") from None
    _check(cfg, where)
    return cfg
