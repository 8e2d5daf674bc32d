"""Agent configuration: YAML, typed, validated at start, overridable from the environment.

Every key has a default fit for a gateway. An unknown or ill-typed key is a
`ConfigError` that names the key path and the file.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import msgspec
import yaml

from agent.brokerurl import DEFAULT_BROKER_URL, parse_broker_url
from agent.topics import DEFAULT_PREFIX, DEVICE_ID_RE, POOL_RE

ENV_PREFIX = "EDGE_AGENT_"
DEFAULT_CONFIG_PATH = Path("/etc/edge-agent/agent.yaml")
DEFAULT_STATE_DIR = "/var/lib/edge-agent"

PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


def _default_device_id() -> str:
    host = socket.gethostname().split(".")[0]
    cleaned = "".join(c if c.isalnum() or c in "-_" else "-" for c in host)[:64]
    return cleaned or "edge-device"


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class BrokerConfig(_Section):
    url: str = DEFAULT_BROKER_URL
    keepalive_s: Annotated[int, msgspec.Meta(ge=5, le=65535)] = 30
    # Kept by the broker across disconnects so QoS 1 jobs wait for us.
    session_expiry_s: Annotated[int, msgspec.Meta(ge=0)] = 3600
    reconnect_min_s: PositiveFloat = 0.5
    reconnect_max_s: PositiveFloat = 30.0
    connect_timeout_s: PositiveFloat = 10.0


class JobsConfig(_Section):
    workers: Annotated[int, msgspec.Meta(ge=1, le=64)] = 2
    queue_size: Annotated[int, msgspec.Meta(ge=1)] = 256
    max_payload_bytes: PositiveInt = 16 * 1024 * 1024
    max_tensor_elements: PositiveInt = 16 * 1024 * 1024
    # Response Topics must lie under one of these; "{prefix}" is the topic prefix.
    reply_prefixes: list[str] = msgspec.field(default_factory=lambda: ["{prefix}/reply/"])
    pools: list[str] = msgspec.field(default_factory=list)


class RuntimeConfig(_Section):
    prefer: list[str] = msgspec.field(default_factory=lambda: ["cuda", "openvino", "onnxruntime"])
    threads: Annotated[int, msgspec.Meta(ge=0)] = 0


class DeployConfig(_Section):
    download_timeout_s: PositiveFloat = 60.0
    max_artifact_bytes: PositiveInt = 2 * 1024 * 1024 * 1024


class TelemetryConfig(_Section):
    interval_s: PositiveFloat = 30.0
    # 0 disables the Prometheus endpoint; it only ever binds to localhost.
    prometheus_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0


class LogConfig(_Section):
    level: str = "INFO"


class AgentConfig(_Section):
    device_id: str = msgspec.field(default_factory=_default_device_id)
    state_dir: str = DEFAULT_STATE_DIR
    topic_prefix: str = DEFAULT_PREFIX
    broker: BrokerConfig = msgspec.field(default_factory=BrokerConfig)
    jobs: JobsConfig = msgspec.field(default_factory=JobsConfig)
    runtime: RuntimeConfig = msgspec.field(default_factory=RuntimeConfig)
    deploy: DeployConfig = msgspec.field(default_factory=DeployConfig)
    telemetry: TelemetryConfig = msgspec.field(default_factory=TelemetryConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    def reply_prefixes_resolved(self) -> tuple[str, ...]:
        return tuple(p.replace("{prefix}", self.topic_prefix) for p in self.jobs.reply_prefixes)


class ConfigError(Exception):
    """One clear line: which file, which key, what is wrong."""


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """EDGE_AGENT_BROKER__URL=... -> {"broker": {"url": "..."}}; values parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment: {name} conflicts with another variable")
        try:
            value = yaml.safe_load(raw) if raw else raw
        except yaml.YAMLError:
            value = raw
        # Ids and URLs stay strings even when they look like numbers.
        node[path[-1]] = raw if isinstance(value, (int, float)) and path[-1] in _STRING_KEYS else value
    return tree


_STRING_KEYS = {"device_id", "url", "state_dir", "topic_prefix", "level"}


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _key_path(exc: msgspec.ValidationError) -> str:
    # msgspec says "... - at `$.broker.url`"; turn that into "broker.url".
    text = str(exc)
    if "at `$" in text:
        return text.split("at `$", 1)[1].rstrip("`").lstrip(".") or "(top level)"
    return "(top level)"


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Read, merge the environment over, and validate. Pure: no files written."""
    environ = os.environ if environ is None else environ
    source = str(path) if path else "(defaults)"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}:{where} not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        data = loaded
    env_tree = _env_overrides(environ)
    if env_tree:
        data = _merge(data, env_tree)
        source += " + EDGE_AGENT_* environment"
    try:
        cfg = msgspec.convert(data, AgentConfig, strict=False)
    except msgspec.ValidationError as exc:
        key = _key_path(exc)
        message = str(exc).split(" - at `$", 1)[0]
        if message.startswith("Object contains unknown field"):
            message = "unknown key " + message.split("unknown field", 1)[1].strip()
            parent = key if key != "(top level)" else ""
            bad = message.split("`")[1] if "`" in message else ""
            key = f"{parent}.{bad}".lstrip(".") if bad else key
        raise ConfigError(f"{source}: key '{key}': {message}") from None
    _check(cfg, source)
    return cfg


def _check(cfg: AgentConfig, source: str) -> None:
    """Cross-field checks that types alone cannot express."""
    if not DEVICE_ID_RE.match(cfg.device_id):
        raise ConfigError(
            f"{source}: key 'device_id': {cfg.device_id!r} must match [A-Za-z0-9_-]{{1,64}}"
        )
    try:
        parse_broker_url(cfg.broker.url)
    except ValueError as exc:
        raise ConfigError(f"{source}: key 'broker.url': {exc}") from None
    if cfg.broker.reconnect_min_s > cfg.broker.reconnect_max_s:
        raise ConfigError(
            f"{source}: key 'broker.reconnect_min_s': must not exceed broker.reconnect_max_s"
        )
    for pool in cfg.jobs.pools:
        if not POOL_RE.match(pool):
            raise ConfigError(f"{source}: key 'jobs.pools': {pool!r} must match [A-Za-z0-9_-]{{1,64}}")
    for prefix in cfg.reply_prefixes_resolved():
        if not prefix or "+" in prefix or "#" in prefix:
            raise ConfigError(f"{source}: key 'jobs.reply_prefixes': {prefix!r} is not a topic prefix")
    if cfg.log.level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError(f"{source}: key 'log.level': {cfg.log.level!r} is not a log level")
    if not cfg.topic_prefix or "+" in cfg.topic_prefix or "#" in cfg.topic_prefix:
        raise ConfigError(f"{source}: key 'topic_prefix': {cfg.topic_prefix!r} is not a topic prefix")
