"""The fleet side's config file (`edge-fleet serve --config fleet.yaml`, `models`, `devices label`).

    broker: {url: mqtt://broker:1883, client_id: edge-fleet-controller}
    prefix: edge/v1
    state_dir: /var/lib/edge-fleet            # registry.sqlite3 lives here by default
    database: postgresql://fleet@db/fleet?schema=edge   # optional; else SQLite in state_dir
    artifact_dir: /var/lib/edge-fleet/artifacts
    http: {host: 0.0.0.0, port: 8780}
    events: {keep: 10000}

Every key has a default; an unknown or ill-typed key, or a key given twice, is an error
naming the key and the file (edgeinfer/configfile.py, the agent's reader too). Command-line
flags win over EDGE_FLEET_<KEY> variables (EDGE_FLEET_BROKER__URL, EDGE_FLEET_HTTP__PORT:
double underscore for nesting), which win over the file, the file over the defaults.
EDGE_FLEET_STATE_DIR and EDGE_FLEET_ARTIFACT_DIR only fill in what the file leaves out.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

import msgspec

# fleet.fleetconfig.ConfigError stays the fleet's name for it (the alias: an explicit re-export).
from edgeinfer.configfile import ConfigError as ConfigError  # noqa: PLC0414
from edgeinfer.configfile import env_overrides, merge, read_yaml_mapping, to_struct
from edgeinfer.contract.brokerurl import DEFAULT_BROKER_URL
from edgeinfer.contract.topics import DEFAULT_PREFIX, DEVICE_ID_RE, topic_prefix_problem
from edgeinfer.fleet.artifacts import ARTIFACT_DIR_ENV, default_artifact_dir
from edgeinfer.fleet.registry import DEFAULT_MAX_EVENTS

ENV_PREFIX = "EDGE_FLEET_"
CONFIG_ENV = "EDGE_FLEET_CONFIG"
# Every command's --broker default; like the flag, it wins over broker.url.
BROKER_ENV = "EDGE_FLEET_BROKER"
STATE_DIR_ENV = "EDGE_FLEET_STATE_DIR"
# EDGE_FLEET_<KEY> overrides a key of the file, except these, which kept the meaning they
# had before: the file's name, the --broker default, and the defaults of state_dir and
# artifact_dir when the file names none (systemd/edge-fleet.service sets both, and must
# not hide what an operator wrote into /etc/edge-fleet/fleet.yaml).
NOT_OVERRIDES = frozenset({CONFIG_ENV, BROKER_ENV, STATE_DIR_ENV, ARTIFACT_DIR_ENV})
REGISTRY_FILE = "registry.sqlite3"


class BrokerSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    url: str = DEFAULT_BROKER_URL
    # The controller keeps a persistent session under this id, so QoS 1 events sent
    # while it restarts wait in the broker. One controller per id.
    client_id: str = "edge-fleet-controller"
    session_expiry_s: Annotated[int, msgspec.Meta(ge=0)] = 86_400
    keepalive_s: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 30


class HttpSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8780


class EventsSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    keep: Annotated[int, msgspec.Meta(ge=1)] = DEFAULT_MAX_EVENTS


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
    """What the field types cannot say; ranges live on the fields themselves."""
    if not DEVICE_ID_RE.match(cfg.broker.client_id):
        raise ConfigError(f"{where}: key 'broker.client_id': {cfg.broker.client_id!r} must "
                          f"match {DEVICE_ID_RE.pattern}")
    problem = topic_prefix_problem(cfg.prefix.strip("/"))
    if problem is not None:
        raise ConfigError(f"{where}: key 'prefix': {cfg.prefix!r} {problem}")


def load_fleet_config(path: Path | str | None,
                      environ: Mapping[str, str] | None = None) -> FleetConfig:
    """The file's config (defaults for what it leaves out; None: no file), with the
    EDGE_FLEET_<KEY> environment laid over it; the same reader as the agent's config."""
    environ = os.environ if environ is None else environ
    where = str(path) if path is not None else "defaults"
    data = read_yaml_mapping(Path(path)) if path is not None else {}
    env_tree = env_overrides(environ, ENV_PREFIX, FleetConfig, skip=NOT_OVERRIDES,
                             only_keys=True)
    if env_tree:
        data = merge(data, env_tree)
        where += " + EDGE_FLEET_* environment"
    cfg = to_struct(data, FleetConfig, where)
    _check(cfg, where)
    return cfg
