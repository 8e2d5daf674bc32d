"""Agent configuration: YAML, typed, validated at start, overridable from the environment.

Every key has a default fit for a gateway. An unknown or ill-typed key is a
`ConfigError` that names the key path and the file.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import msgspec

from edgeinfer.agent.faults import CRASH_ENV, FAIL_RUNTIME_ENV
from edgeinfer.agent.trust import TrustConfig, load_trusted_keys

# ConfigError lives with the reader the fleet's config shares; agent.config.ConfigError
# stays its public name on the agent's side (the alias is mypy's explicit re-export).
from edgeinfer.configfile import ConfigError as ConfigError  # noqa: PLC0414
from edgeinfer.configfile import env_overrides, merge, read_yaml_mapping, to_struct
from edgeinfer.contract.brokerurl import DEFAULT_BROKER_URL, parse_broker_url
from edgeinfer.contract.topics import (
    DEFAULT_PREFIX,
    DEVICE_ID_RE,
    POOL_RE,
    reply_prefix_problem,
    topic_prefix_problem,
)

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


class TlsConfig(_Section):
    """TLS for mqtts:// URLs. Verification is always on; nothing here turns it off."""

    # PEM CA bundle the broker's certificate must chain to (default: the system CA store).
    ca_file: str | None = None
    # Client certificate and key for mutual TLS (PEM); key_file may be left out when the
    # key is inside cert_file.
    cert_file: str | None = None
    key_file: str | None = None
    # The name the broker's certificate must carry (default: the host of broker.url).
    server_name: str | None = None


class BrokerConfig(_Section):
    url: str = DEFAULT_BROKER_URL
    tls: TlsConfig = msgspec.field(default_factory=TlsConfig)
    # MQTT username; its password comes from password_file, else from
    # $CREDENTIALS_DIRECTORY/<password_credential> (systemd LoadCredential=), never from here.
    username: str | None = None
    password_file: str | None = None
    password_credential: str = "mqtt-password"  # noqa: S105 - a credential's name, not a password
    keepalive_s: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 30
    # Kept by the broker across disconnects so QoS 1 jobs wait for us.
    session_expiry_s: Annotated[int, msgspec.Meta(ge=0)] = 3600
    reconnect_min_s: PositiveFloat = 0.5
    reconnect_max_s: PositiveFloat = 30.0
    connect_timeout_s: PositiveFloat = 10.0
    # After another client took our session over (a second agent with this device id), the
    # next connect waits this long (x1 to x1.5, jittered), doubling on each repeat up to the
    # max: two twins then take turns a few times a minute at most instead of storming.
    takeover_backoff_s: PositiveFloat = 20.0
    takeover_backoff_max_s: PositiveFloat = 300.0


class JobsConfig(_Section):
    workers: Annotated[int, msgspec.Meta(ge=1, le=64)] = 2
    queue_size: Annotated[int, msgspec.Meta(ge=1)] = 256
    # A job's MQTT payload (the OIP request: JSON header and binary tensors) over this is
    # refused INVALID_ARGUMENT by the session's reader before it is held whole, journaled or
    # acknowledged: its payload bytes are dropped as they stream in (agent/mqtt_session/).
    # A broker's max_packet_size should be this plus PUBLISH_HEAD_MAX (docs/deploy.md).
    max_message_bytes: PositiveInt = 16 * 1024 * 1024
    # Deprecated name of max_message_bytes (same meaning), read so that a gateway's existing
    # config still starts after an upgrade; giving both is an error (_check).
    max_payload_bytes: PositiveInt | None = None
    max_tensor_elements: PositiveInt = 16 * 1024 * 1024
    # Response Topics must lie under one of these; "{prefix}" is the topic prefix.
    reply_prefixes: list[str] = msgspec.field(default_factory=lambda: ["{prefix}/reply/"])
    pools: list[str] = msgspec.field(default_factory=list)
    # Pool jobs come on a session of their own with session expiry 0 (agent/daemon.py):
    # the broker stops handing a member pool jobs once it sees the member's link is gone:
    # at once when the process dies, within 1.5 x this keepalive when the host or network
    # goes silent. That is the bound on pool jobs routed to a dead member.
    pool_keepalive_s: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 5
    # Journaled jobs waiting to run are bounded by count (queue_size) and by bytes; past
    # either bound a new job is answered RESOURCE_EXHAUSTED at once and not kept.
    max_queued_bytes: PositiveInt = 256 * 1024 * 1024
    # parameters.priority: lower runs first (1 is the most urgent, as in Triton); jobs
    # that give none run at this level. Within a level, the earliest deadline goes first.
    default_priority: Annotated[int, msgspec.Meta(ge=1)] = 10
    # A job whose run was cut short this many times (the agent died or was restarted by
    # the watchdog while running it) is answered INTERNAL instead of being run again.
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    # A job id seen again within this window is answered from its stored answer.
    dedup_window_s: PositiveFloat = 600.0
    # Copies of jobs waiting for a shadow version (agent/shadow.py) are bounded by count
    # and by bytes; past either, a copy is dropped and counted (`dropped`), never waited for.
    shadow_backlog: Annotated[int, msgspec.Meta(ge=1)] = 64
    # ... and by the bytes of tensors they hold (a job's inputs and its answer's outputs).
    shadow_backlog_bytes: PositiveInt = 64 * 1024 * 1024


class JournalConfig(_Section):
    # NORMAL survives a killed agent; FULL also survives power loss (an fsync per commit).
    synchronous: str = "NORMAL"


class OutboxConfig(_Section):
    """Answers and events waiting for the broker's PUBACK, kept on disk.

    When full, workers stop taking jobs until the broker takes answers again (jobs wait
    in the journal, and jobs beyond `jobs.queue_size` are refused RESOURCE_EXHAUSTED);
    events are dropped and counted.
    """

    max_messages: PositiveInt = 10_000
    max_bytes: PositiveInt = 64 * 1024 * 1024
    window: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 256


class RuntimeConfig(_Section):
    # ["auto"]: tune at deploy (runtimes/autotune.py); a list of runtimes pins an order.
    prefer: list[str] = msgspec.field(default_factory=lambda: ["auto"])
    threads: Annotated[int, msgspec.Meta(ge=0)] = 0
    # Upper bound on one model's auto-tuning (loads, checks and timed runs of every candidate).
    autotune_budget_s: PositiveFloat = 10.0
    # Consecutive failed runs (an exception, or NaN/Inf from finite inputs) before a serving
    # runtime is demoted to the next candidate (agent/failover.py).
    failover_after: Annotated[int, msgspec.Meta(ge=1)] = 3


class DeployConfig(_Section):
    # A deadline for the whole download of one artifact, from connecting to the last byte.
    download_timeout_s: PositiveFloat = 60.0
    max_artifact_bytes: PositiveInt = 2 * 1024 * 1024 * 1024
    # mqtt:// artifacts (agent/chunk_client.py): bytes asked for per chunk, chunks asked
    # for at once, an optional cap in bytes/s (0: none), and how long an unanswered chunk
    # waits before it is asked for again.
    mqtt_chunk_bytes: Annotated[int, msgspec.Meta(ge=4096, le=16 * 1024 * 1024)] = 256 * 1024
    mqtt_chunks_in_flight: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    mqtt_max_bytes_per_s: Annotated[int, msgspec.Meta(ge=0)] = 0
    mqtt_chunk_timeout_s: PositiveFloat = 10.0
    # Without trust keys, accept a manifest whose revision is lower than the applied one
    # (the behaviour before revisions only moved forward). With keys it is always refused.
    allow_rollback: bool = False


class ModelsConfig(_Section):
    """Models served from a folder on the gateway, no fleet needed (agent/local_models.py),
    and the model cache's memory budget (agent/model_cache.py)."""

    # <local_dir>/<name>/<version>/ folders, each with model.onnx (or one *.onnx file) and an
    # optional model.yaml; empty: off.
    local_dir: str = ""
    # How often the folder is looked at; a version folder is taken once two looks agree.
    scan_interval_s: PositiveFloat = 2.0
    # The loaded models' measured memory (MB) may not go over this: a lazy model's load
    # first unloads the least recently used unpinned lazy ones. None: no budget.
    memory_budget_mb: PositiveFloat | None = None
    # A loaded, unpinned lazy model with no job for this long is unloaded. None: never.
    idle_unload_s: PositiveFloat | None = None


class TelemetryConfig(_Section):
    interval_s: PositiveFloat = 30.0
    # 0 disables the Prometheus endpoint; it only ever binds to localhost.
    prometheus_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0


class HttpConfig(_Section):
    """The local KServe v2 REST endpoint (agent/http_endpoint/): off unless `listen` is set.

    Its request body limit is jobs.max_message_bytes, as a job's over MQTT."""

    # "host:port" to listen on, e.g. "127.0.0.1:8000" ("[::1]:8000" for IPv6); empty: off.
    # Meant for processes on the gateway itself: an address other than a loopback one
    # opens inference to the network, so it is taken only as written here, never a default.
    listen: str = ""
    # Requests being handled at once (reading, queued as jobs, answering); one more is
    # answered 503 at once.
    max_concurrent: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 64
    # One request from its first byte to its answer: reading the body, waiting in the job
    # queue, running. Past it: 504, and the job's deadline passes with it.
    request_timeout_s: PositiveFloat = 60.0
    # How long an idle kept-alive connection stays open.
    keepalive_s: PositiveFloat = 75.0


class LogConfig(_Section):
    level: str = "INFO"


class ServiceConfig(_Section):
    """Running under systemd (agent/lifecycle.py, systemd/edge-agent.service)."""

    # SIGTERM: jobs already taken get this long to be answered before the agent exits.
    drain_timeout_s: Annotated[float, msgspec.Meta(ge=0)] = 20.0
    # WATCHDOG=1 stops when a job has run longer than this (a hung runtime or driver) ...
    job_stall_s: PositiveFloat = 300.0
    # ... or when the MQTT network thread has not gone round its loop for this long.
    network_stall_s: PositiveFloat = 60.0


class AgentConfig(_Section):
    device_id: str = msgspec.field(default_factory=_default_device_id)
    state_dir: str = DEFAULT_STATE_DIR
    topic_prefix: str = DEFAULT_PREFIX
    broker: BrokerConfig = msgspec.field(default_factory=BrokerConfig)
    jobs: JobsConfig = msgspec.field(default_factory=JobsConfig)
    runtime: RuntimeConfig = msgspec.field(default_factory=RuntimeConfig)
    deploy: DeployConfig = msgspec.field(default_factory=DeployConfig)
    models: ModelsConfig = msgspec.field(default_factory=ModelsConfig)
    # Keys that sign manifests (agent/trust.py); none: manifests need no signature.
    trust: TrustConfig = msgspec.field(default_factory=TrustConfig)
    journal: JournalConfig = msgspec.field(default_factory=JournalConfig)
    outbox: OutboxConfig = msgspec.field(default_factory=OutboxConfig)
    telemetry: TelemetryConfig = msgspec.field(default_factory=TelemetryConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    service: ServiceConfig = msgspec.field(default_factory=ServiceConfig)

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    def reply_prefixes_resolved(self) -> tuple[str, ...]:
        return tuple(p.replace("{prefix}", self.topic_prefix) for p in self.jobs.reply_prefixes)


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Read, merge the environment over, and validate. Pure: no files written.

    What the running system must also offer (a writable state_dir, readable TLS files, a
    broker host that resolves) is checked apart, by agent/preflight.py.
    """
    environ = os.environ if environ is None else environ
    source = str(path) if path else "(defaults)"
    data = read_yaml_mapping(path) if path is not None else {}
    # EDGE_AGENT_CONFIG names the file; EDGE_AGENT_TEST_* are test hooks (faults).
    env_tree = env_overrides(environ, ENV_PREFIX, AgentConfig,
                             skip={ENV_PREFIX + "CONFIG", CRASH_ENV, FAIL_RUNTIME_ENV})
    if env_tree:
        data = merge(data, env_tree)
        source += " + EDGE_AGENT_* environment"
    _refuse_inline_password(data, source)
    cfg = to_struct(data, AgentConfig, source)
    _check(cfg, source)
    _take_old_message_limit(cfg, data, source)
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
    _check_transport(cfg.broker, source)
    try:
        load_trusted_keys(cfg.trust)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    if cfg.broker.reconnect_min_s > cfg.broker.reconnect_max_s:
        raise ConfigError(
            f"{source}: key 'broker.reconnect_min_s': must not exceed broker.reconnect_max_s"
        )
    if cfg.broker.takeover_backoff_s > cfg.broker.takeover_backoff_max_s:
        raise ConfigError(
            f"{source}: key 'broker.takeover_backoff_s': must not exceed "
            "broker.takeover_backoff_max_s"
        )
    # Here, not at the top: runtimes.selection imports numpy, which `edge-agent version`
    # (it imports this module) has no use for.
    from edgeinfer.runtimes.selection import check_preference  # noqa: PLC0415

    try:
        check_preference(cfg.runtime.prefer)
    except ValueError as exc:
        raise ConfigError(f"{source}: key 'runtime.prefer': {exc}") from None
    for pool in cfg.jobs.pools:
        if not POOL_RE.match(pool):
            raise ConfigError(f"{source}: key 'jobs.pools': {pool!r} must match [A-Za-z0-9_-]{{1,64}}")
    problem = topic_prefix_problem(cfg.topic_prefix)
    if problem is not None:
        raise ConfigError(f"{source}: key 'topic_prefix': {cfg.topic_prefix!r} {problem}")
    for index, reply in enumerate(cfg.reply_prefixes_resolved()):
        problem = reply_prefix_problem(reply, cfg.topic_prefix)
        if problem is not None:
            raise ConfigError(f"{source}: key 'jobs.reply_prefixes[{index}]': {reply!r} {problem}")
    if cfg.http.listen:
        try:
            http_address(cfg.http.listen)
        except ValueError as exc:
            raise ConfigError(f"{source}: key 'http.listen': {exc}") from None
    if cfg.models.local_dir and not Path(cfg.models.local_dir).is_absolute():
        raise ConfigError(f"{source}: key 'models.local_dir': {cfg.models.local_dir!r} must be "
                          "an absolute path")
    if cfg.journal.synchronous.upper() not in {"NORMAL", "FULL"}:
        raise ConfigError(f"{source}: key 'journal.synchronous': must be NORMAL or FULL")
    if cfg.log.level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError(f"{source}: key 'log.level': {cfg.log.level!r} is not a log level")


def http_address(listen: str) -> tuple[str, int]:
    """`http.listen` as (host, port): an IP address (IPv6 in brackets) or "localhost", and
    a port 1-65535. Raises ValueError saying what is wrong."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{listen!r} must be host:port, e.g. 127.0.0.1:8000")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{listen!r}: {host!r} is no IP address (nor localhost)") from None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{listen!r}: the port must be 1-65535")
    return host, int(port_text)


def _take_old_message_limit(cfg: AgentConfig, data: Mapping[str, Any], source: str) -> None:
    """jobs.max_payload_bytes (its old name) is taken as jobs.max_message_bytes."""
    jobs = cfg.jobs
    old = jobs.max_payload_bytes
    if old is None:
        return
    given = data.get("jobs")
    if isinstance(given, Mapping) and "max_message_bytes" in given:
        raise ConfigError(
            f"{source}: key 'jobs.max_payload_bytes': it is the old name of "
            "jobs.max_message_bytes, which is also given; keep only jobs.max_message_bytes"
        )
    jobs.max_message_bytes = old
    jobs.max_payload_bytes = None


def deprecations(cfg_path: Path | None) -> list[str]:
    """Deprecated keys in the config file, as lines to log at start (the config is valid)."""
    data = read_yaml_mapping(cfg_path) if cfg_path is not None else {}
    jobs = data.get("jobs")
    if isinstance(jobs, Mapping) and "max_payload_bytes" in jobs:
        return [f"{cfg_path}: key 'jobs.max_payload_bytes' is deprecated: it is read as "
                "jobs.max_message_bytes; rename it"]
    return []


def _refuse_inline_password(data: Mapping[str, Any], source: str) -> None:
    """A password in the YAML or the environment is refused, and never echoed."""
    broker = data.get("broker")
    if isinstance(broker, Mapping) and "password" in broker:
        raise ConfigError(
            f"{source}: key 'broker.password': a password is never read from the config or "
            "the environment; put it in a file readable only by the agent and name it with "
            "broker.password_file, or hand it over with systemd LoadCredential= "
            "(read from $CREDENTIALS_DIRECTORY/<broker.password_credential>)"
        )


def _check_transport(broker: BrokerConfig, source: str) -> None:
    """TLS options only with mqtts://, files that exist, a password only with a username."""
    tls = broker.tls
    named = {f"broker.tls.{k}": getattr(tls, k) for k in ("ca_file", "cert_file", "key_file")}
    named["broker.password_file"] = broker.password_file
    if not parse_broker_url(broker.url).tls:
        given = [k for k, v in named.items() if k.startswith("broker.tls.") and v]
        if given or tls.server_name:
            raise ConfigError(
                f"{source}: key 'broker.tls': TLS options are set but broker.url is mqtt:// "
                "(plain TCP); use mqtts:// (they are never ignored silently)"
            )
    for key, value in named.items():
        if value is not None and not Path(value).is_file():
            what = "not a file" if Path(value).exists() else "no such file"
            raise ConfigError(f"{source}: key '{key}': {value}: {what}")
    if tls.key_file and not tls.cert_file:
        raise ConfigError(f"{source}: key 'broker.tls.key_file': needs broker.tls.cert_file")
    if tls.server_name is not None and not tls.server_name.strip():
        raise ConfigError(f"{source}: key 'broker.tls.server_name': must not be empty")
    if broker.username is not None and not broker.username:
        raise ConfigError(f"{source}: key 'broker.username': must not be empty")
    if broker.password_file and broker.username is None:
        raise ConfigError(f"{source}: key 'broker.password_file': needs broker.username")
    cred = broker.password_credential
    if not cred or "/" in cred or cred in {".", ".."}:
        raise ConfigError(
            f"{source}: key 'broker.password_credential': {cred!r} must be a plain file name"
        )
