"""The agent's `state`, `reported` and `events` documents as typed Structs (docs/protocol.md).

The agent builds these and encodes them with `encode`; the fleet reads them with the
`read_*` functions, which are lenient (edgeinfer.contract.lenient): a document from an older
or newer agent, with keys missing, keys added or one field of the wrong type, still gives a
usable Struct. Telemetry has its own module, edgeinfer.contract.telemetry.

Field defaults serve the readers (what an older agent's document lacks); the agent always
fills every field it publishes. A field the agent publishes only sometimes (a serving model's
`precision`, an event's `model`) is left out of the wire when unset: `UNSET` for the model
entry's serving-only fields, None on events (every event field with a None value is left
out, as the agent always did).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

from edgeinfer.contract import lenient
from edgeinfer.contract.telemetry import ShadowFigures

_encoder = msgspec.json.Encoder()


def encode(doc: msgspec.Struct) -> bytes:
    """A document as the JSON the agent publishes."""
    return _encoder.encode(doc)


# -- state -----------------------------------------------------------------------------


class State(msgspec.Struct):
    """`dev/{dev}/state`, retained: the agent's birth (`online`) and its will (`offline`)."""

    state: str | None = None  # "online" | "offline"
    agent_version: str | None = None
    session_id: str | None = None  # new per agent process
    started_at: str | None = None  # ISO 8601 UTC, seconds


def read_state(payload: bytes) -> State | None:
    """A `state` payload, or None when it is no JSON object (see `state_word` for a bare
    word will)."""
    return lenient.decode(payload, State)


def state_word(payload: bytes) -> str:
    """`online`/`offline` from a `state` payload; a bare word (a hand-made will) works too;
    `unknown` when it says nothing."""
    state = read_state(payload)
    if state is not None:
        return state.state or "unknown"
    try:
        if isinstance(msgspec.json.decode(payload), dict):
            return "unknown"  # an object whose `state` is no text
    except msgspec.DecodeError:
        pass
    return payload.decode("utf-8", "replace").strip() or "unknown"


# -- reported --------------------------------------------------------------------------


class Attempt(msgspec.Struct):
    """One runtime the agent tried for a model, in order (the winner last)."""

    runtime: str | None = None
    device: str | None = None  # "" when skipped before a device was chosen
    ok: bool = False
    reason: str | None = None  # "" when ok


class Candidate(msgspec.Struct):
    """One candidate an auto-tuned model was measured on (runtimes/autotune.py)."""

    runtime: str | None = None
    device: str | None = None
    precision: str | None = None  # "f32" | "bf16" | "int8"
    ok: bool = False
    reason: str | None = None
    p50_ms: float | None = None
    agrees: bool | None = None  # with the reference; None when not compared
    runs: int = 0
    # int8 only: top-1 agreement with the reference on the calibration set (a classifier),
    # else the share of output values within tolerance (runtimes/quantize.py).
    agreement: float | None = None


class Autotune(msgspec.Struct):
    """How an auto-tuned model's runtime was chosen (null in `reported` when pinned)."""

    cached: bool = False
    tuning_s: float | None = None
    reference: str | None = None  # the reference candidate's label


class Failover(msgspec.Struct):
    """One live failover of a serving model (agent/failover.py)."""

    from_: str | None = msgspec.field(default=None, name="from")  # "runtime/device"
    to: str | None = None
    reason: str | None = None
    at: str | None = None  # ISO 8601 UTC, seconds


class RoleEntry(msgspec.Struct):
    """One model of a multi-model version (`ocr`: det, rec, cls) with its own choice."""

    file: str | None = None
    sha256: str | None = None
    runtime: str | None = None
    device: str | None = None
    precision: str | None = None
    candidates: list[Candidate] = []
    autotune: Autotune | None = None
    attempts: list[Attempt] = []


class TensorMetadata(msgspec.Struct):
    """One input or output of a model as OIP's model metadata describes it (KServe v2
    `$metadata_tensor`): in `reported.models[]` and in a ModelMetadata answer
    (edgeinfer.contract.queries)."""

    name: str
    datatype: str  # OIP datatype (edgeinfer.contract.datatypes)
    shape: list[int]  # -1 for a dynamic dimension; [] when the runtime knows no rank


class ModelEntry(msgspec.Struct):
    """One model version in `reported.models`: loading, serving or failed.

    The fields after `attempts` come with serving models only (UNSET, so left out of the
    wire, otherwise); `roles` only with a multi-model version. `inputs` and `outputs` are
    what a job sends and gets back: the task pipeline's tensors when the task has one (an
    encoded image, not the model's pixel tensor), else the model's; left out when the
    pipeline cannot be built (its first job says why).
    """

    name: str
    version: str
    sha256: str | None = None
    state: str | None = None  # "loading" | "serving" | "failed"
    runtime: str | None = None
    device: str | None = None
    error: str | None = None
    attempts: list[Attempt] = []
    precision: str | UnsetType = UNSET  # "f32" | "bf16" | "int8"
    candidates: list[Candidate] | UnsetType = UNSET  # auto-tuned only, else []
    autotune: Autotune | UnsetType | None = UNSET  # None when pinned
    failovers: list[Failover] | UnsetType = UNSET
    roles: dict[str, RoleEntry] | UnsetType = UNSET
    task: str | UnsetType = UNSET  # the manifest's (edgeinfer.contract.tasks)
    inputs: list[TensorMetadata] | UnsetType = UNSET
    outputs: list[TensorMetadata] | UnsetType = UNSET
    # A/B and shadow (manifest `traffic`, `shadow`): only on the versions that give them.
    traffic: int | UnsetType = UNSET
    shadow: bool | UnsetType = UNSET
    shadow_stats: ShadowFigures | UnsetType = UNSET  # a serving shadow's, once it has any
    # The model cache (agent/model_cache.py), on serving versions: whether its sessions are
    # loaded now (a `load: lazy` one may not be), and the growth of the agent's memory in
    # use (MB) over its load and warm-up at deploy.
    loaded: bool | UnsetType = UNSET
    memory_mb: float | UnsetType = UNSET


class CpuSummary(msgspec.Struct):
    model: str | None = None
    cores_physical: int | None = None
    cores_logical: int | None = None
    flags: list[str] = []  # the notable ones only (runtimes/hardware.py)


class GpuSummary(msgspec.Struct):
    index: int | None = None
    name: str | None = None
    memory_mb: int | None = None  # None when only /proc/driver/nvidia was readable


class OnnxRuntimeSummary(msgspec.Struct):
    version: str | None = None  # "" when not installed
    providers: list[str] = []


class OpenVinoSummary(msgspec.Struct):
    version: str | None = None  # "" when not installed
    devices: dict[str, str] = {}  # device -> its full name


class Hardware(msgspec.Struct):
    """`reported.hardware`: what the device offers for inference."""

    cpu: CpuSummary = msgspec.field(default_factory=CpuSummary)
    memory_mb: int | None = None
    nvidia_gpus: list[GpuSummary] = []
    onnxruntime: OnnxRuntimeSummary = msgspec.field(default_factory=OnnxRuntimeSummary)
    openvino: OpenVinoSummary = msgspec.field(default_factory=OpenVinoSummary)
    errors: list[str] = []  # "runtime X unavailable: reason", probe failures


class Reported(msgspec.Struct):
    """`dev/{dev}/reported`, retained: what the device serves and how it got there."""

    device_id: str | None = None
    agent_version: str | None = None
    revision: int | None = None  # applied; advances only when every model serves
    rollback: bool = False  # the applied revision's manifest said "rollback": true
    models: list[ModelEntry] = []
    last_error: str | None = None
    hardware: Hardware = msgspec.field(default_factory=Hardware)
    updated_at: str | None = None  # ISO 8601 UTC

    def find_model(self, name: str, version: str | None = None) -> ModelEntry | None:
        """The entry of `name` (and `version`, when given)."""
        return next((m for m in self.models
                     if m.name == name and (version is None or m.version == version)), None)


def read_reported(payload: bytes) -> Reported | None:
    """A `reported` payload, or None when it is no JSON object."""
    return lenient.decode(payload, Reported)


# -- events ----------------------------------------------------------------------------


class RoleServing(msgspec.Struct):
    """`model_serving.roles[role]` of a multi-model version."""

    runtime: str | None = None
    device: str | None = None
    precision: str | None = None
    latency_ms: float | None = None


class Event(msgspec.Struct, omit_defaults=True, kw_only=True):
    """`dev/{dev}/events`: the envelope (`ts`, `type`, `device_id`) and the fields the
    event types carry, each None (left out) where a type has none.

    Comments name the types a field comes with; docs/protocol.md "Events" says what each
    type means. An event may carry a field not listed here (`extra` of `encode_event`);
    a reader ignores it.
    """

    ts: str | None = None  # ISO 8601 UTC, seconds
    type: str
    device_id: str | None = None
    # the model version it is about (deploy, serving, failover events)
    model: str | None = None
    version: str | None = None
    sha256: str | None = None  # artifact_verified
    # deploy_started, deploy_finished/failed/superseded, manifest_rejected
    revision: int | None = None
    rollback: bool | None = None  # deploy_*: only true, when the manifest said so
    by: int | None = None  # deploy_superseded: the newer revision
    seconds: float | None = None  # deploy_finished/failed/superseded
    message: str | None = None  # what a person reads
    reason: str | None = None  # manifest_rejected, failovers, broker_* and session events
    stage: str | None = None  # model_failed: artifact | load | health | pipeline
    cause: str | None = None  # model_failed ("deadline"), disk_full
    # model_serving, runtime_failover(_failed)
    runtime: str | None = None
    device: str | None = None
    precision: str | None = None
    autotune: Autotune | None = None  # model_serving, auto-tuned only
    fallbacks: list[str] | None = None  # model_serving: "runtime/device: reason"
    latency_ms: float | None = None  # model_serving, when a latency budget was measured
    roles: dict[str, RoleServing] | None = None  # model_serving, multi-model versions
    from_runtime: str | None = None  # runtime_failover
    from_device: str | None = None
    skipped: list[str] | None = None  # runtime_failover: candidates that did not load
    # disk_full, disk_recovered
    state_dir: str | None = None
    writer: str | None = None  # journal | outbox
    free_bytes: int | None = None
    full_s: float | None = None
    # config_reloaded: key paths
    applied: list[str] | None = None
    restart_needed: list[str] | None = None
    # MQTT session events
    link: str | None = None  # "pool" for the pool session's
    client_id: str | None = None  # session_taken_over
    retry_in_s: float | None = None
    takeovers: int | None = None
    packet: str | None = None  # mqtt_packet_unreadable
    bytes_: int | None = msgspec.field(default=None, name="bytes")
    topic: str | None = None


# Event fields by their name on the wire: the keyword arguments `event` takes as typed.
_EVENT_FIELDS = {f.encode_name: f.name for f in msgspec.structs.fields(Event)}


def event(kind: str, ts: str, device_id: str, fields: Mapping[str, Any]
          ) -> tuple[Event, dict[str, Any]]:
    """An event of `kind` from the keyword fields an emitter gave (None ones left out):
    the Event and the fields it has no place for (to go out beside it)."""
    known: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in fields.items():
        if value is None or key in ("type", "ts", "device_id"):
            continue  # the envelope is the agent's own, never an emitter's
        if key in _EVENT_FIELDS:
            known[_EVENT_FIELDS[key]] = value
        else:
            extra[key] = value
    return Event(type=kind, ts=ts, device_id=device_id, **known), extra


def encode_event(doc: Event, extra: Mapping[str, Any] | None = None) -> bytes:
    """An event as published, with fields that have no place in Event (`extra`) beside it."""
    if not extra:
        return _encoder.encode(doc)
    return _encoder.encode({**msgspec.to_builtins(doc), **extra})


def read_event(payload: bytes) -> Event | None:
    """An `events` payload, or None when it is no JSON object or has no text `type`."""
    return lenient.decode(payload, Event)
