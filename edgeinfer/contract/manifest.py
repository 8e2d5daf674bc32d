"""The desired-state manifest of DESIGN.md: typed, validated, canonically encoded.

A manifest is decoded once into a plain JSON object and converted from that into
typed structs, so what a signature covers (`Published.signed_bytes`: the canonical
JSON of that same object without `signature`) is exactly what the agent acts on.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
import rfc8785

from edgeinfer.contract.datatypes import OIP_DATATYPES
from edgeinfer.contract.quantize import quantize_problem
from edgeinfer.contract.tasks import MULTI_MODEL_TASKS
from edgeinfer.contract.topics import NAME_RE
from edgeinfer.contract.traffic import TRAFFIC_TOTAL
from edgeinfer.structcheck import StructError, convert, not_utf8

SHA256_RE = r"^[0-9a-f]{64}$"

Name = Annotated[str, msgspec.Meta(pattern=NAME_RE.pattern)]
Sha256 = Annotated[str, msgspec.Meta(pattern=SHA256_RE)]


class RuntimePolicy(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    # Entries: "cuda", "openvino", "openvino:<DEVICE>", "onnxruntime".
    prefer: list[str] | None = None


class Batching(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    max_batch: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 1
    max_delay_ms: Annotated[float, msgspec.Meta(ge=0, le=10_000)] = 0.0


class HealthTensor(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One OIP v2 tensor with JSON data: a sample input, or an expected output."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    datatype: str
    shape: list[Annotated[int, msgspec.Meta(ge=0)]]
    data: list[Any]


class Health(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The health gate a new version passes before it replaces a serving one.

    `inputs` also feed the warm-up; `expected` outputs are compared with `rtol`/`atol`
    (numpy.allclose; exact for integers, booleans and bytes); `max_latency_ms` bounds the
    median time of one inference on those inputs (or on the synthetic warm-up inputs).
    """

    inputs: list[HealthTensor] = msgspec.field(default_factory=list)
    expected: list[HealthTensor] = msgspec.field(default_factory=list)
    rtol: Annotated[float, msgspec.Meta(ge=0)] = 1e-3
    atol: Annotated[float, msgspec.Meta(ge=0)] = 1e-5
    max_latency_ms: Annotated[float, msgspec.Meta(gt=0)] | None = None


class ArtifactFile(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A file installed beside the model in its version's folder (a tokenizer, labels,
    the other models of a multi-model pipeline), fetched and verified like the model."""

    name: Name
    uri: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    sha256: Sha256
    size: Annotated[int, msgspec.Meta(ge=1)]


class ModelSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: Name
    version: Name
    uri: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    sha256: Sha256
    size: Annotated[int, msgspec.Meta(ge=1)]
    task: Name = "tensor"
    format: Name = "onnx"
    runtime: RuntimePolicy = RuntimePolicy()
    batching: Batching = Batching()
    instances: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    health: Health | None = None
    # The task pipeline's settings (docs/pipelines.md); ignored by `tensor`.
    settings: dict[str, Any] = msgspec.field(default_factory=dict)
    # Side files; for a multi-model task (`ocr`) also its other models (`model_roles`).
    files: list[ArtifactFile] = msgspec.field(default_factory=list)
    # A/B: the percent of the name's jobs that name no version this version gets (the
    # serving versions of one name add up to 100; docs/protocol.md, "A/B and shadow").
    traffic: Annotated[int, msgspec.Meta(ge=0, le=100)] | None = None
    # Shadow: gets a copy of each job of its name; its answers are never sent.
    shadow: bool = False
    # INT8 at deploy: edgeinfer/contract/quantize.py, docs/protocol.md.
    quantize: str | None = None
    quantize_calibration: Name | None = None
    quantize_min_agreement: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.99
    # The model cache (agent/model_cache.py, docs/protocol.md "Lazy models"): `lazy` is
    # gated at deploy, then unloaded until its first job; `pin` keeps it once loaded.
    load: Literal["eager", "lazy"] = "eager"
    pin: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, self.version)


class Signature(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    alg: str
    key_id: str
    value: str


# omit_defaults: a field left at its default is not written, so an agent that predates a
# field (`rollback`) still reads what a newer edge-fleet publishes without it.
class Manifest(msgspec.Struct, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    revision: Annotated[int, msgspec.Meta(ge=0)]
    models: list[ModelSpec]
    issued_at: str | None = None
    expires_at: str | None = None
    # Set by `edge-fleet deploy --rollback` and a rollout rolling back: this (higher)
    # revision brings back older content on purpose. Signed like the rest; reported in
    # the agent's deploy events.
    rollback: bool = False
    signature: Signature | None = None


class ManifestError(ValueError):
    """A manifest that must be refused; the message says why, `reason` says it in one word.

    Reasons: `invalid` (not a manifest this agent can read), and those of agent.verifier:
    `unsigned`, `unsupported_algorithm`, `unknown_key`, `bad_signature`, `rollback`,
    `reused_revision`, `expired`.
    """

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Published:
    """A decoded manifest and the bytes its signature covers."""

    manifest: Manifest
    signed_bytes: bytes

    @property
    def digest(self) -> str:
        """What the manifest says, as one value: the sha256 of `signed_bytes` (so the same
        content signed again, or by another key, has the same digest)."""
        return hashlib.sha256(self.signed_bytes).hexdigest()


_URI_RE = re.compile(r"^(file|https?|mqtt)://", re.IGNORECASE)
# mqtt:// artifacts come over the agent's own broker: no host, one content-addressed path.
MQTT_URI_RE = re.compile(r"^mqtt:///artifacts/sha256/([0-9a-f]{64})$")
_RFC3339_RE = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})$"
)


def parse_rfc3339(text: str) -> datetime:
    """An RFC 3339 timestamp with its offset, e.g. 2026-11-23T10:00:00Z; ValueError otherwise."""
    m = _RFC3339_RE.match(text)
    if m is None:
        raise ValueError(f"{text!r} is not an RFC 3339 timestamp (e.g. 2026-11-23T10:00:00Z)")
    date, clock, fraction, offset = m.groups()
    micros = (fraction or "").ljust(6, "0")[:6]
    zone = "+00:00" if offset in ("Z", "z") else offset
    try:
        parsed = datetime.fromisoformat(f"{date}T{clock}.{micros}{zone}")
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a valid timestamp: {exc}") from None
    return parsed.astimezone(UTC)


def _flat_count(data: Any) -> int:
    if isinstance(data, list):
        return sum(_flat_count(item) for item in data)
    return 1


def _check_tensors(label: str, what: str, tensors: list[HealthTensor]) -> None:
    names: set[str] = set()
    for t in tensors:
        where = f"model {label}: health.{what} {t.name!r}"
        if t.name in names:
            raise ManifestError(f"{where} is given twice")
        names.add(t.name)
        if t.datatype not in OIP_DATATYPES:
            raise ManifestError(
                f"{where}: unknown datatype {t.datatype!r} (known: {', '.join(sorted(OIP_DATATYPES))})"
            )
        want = math.prod(t.shape)
        have = _flat_count(t.data)
        if have != want:
            raise ManifestError(f"{where}: shape {t.shape} needs {want} values, data has {have}")


def _check_health(m: ModelSpec) -> None:
    if m.health is None:
        return
    label = f"{m.name}:{m.version}"
    if m.health.expected and not m.health.inputs:
        raise ManifestError(f"model {label}: health.expected needs health.inputs to compare on")
    _check_tensors(label, "inputs", m.health.inputs)
    _check_tensors(label, "expected", m.health.expected)


@dataclass(frozen=True)
class RoleModel:
    """One model of a multi-model version (a task of MULTI_MODEL_TASKS, e.g. `ocr`)."""

    role: str  # "det", "rec", "cls"
    file: str  # its name in the version's folder: model.onnx for the entry's own artifact
    sha256: str
    size: int


def model_roles(m: ModelSpec) -> list[RoleModel] | None:
    """The models of a multi-model version by role, required roles first; None for the
    tasks that run one model. Raises ManifestError naming the roles when they do not fit.

    The entry's own artifact (`uri`, `sha256`; `model.onnx` in the version's folder) is the
    first required role (`det` for `ocr`); every other role is the file of `files` named
    `<role>.onnx`. A `<first role>.onnx` in `files` is accepted only as the same file as the
    artifact. Other `.onnx` files are refused; files of other kinds (`characters.txt`) are
    the pipeline's side files.
    """
    roles = MULTI_MODEL_TASKS.get(m.task)
    if roles is None:
        return None
    required, optional = roles
    label = f"model {m.name}:{m.version} (task {m.task})"
    names = (f"{', '.join(required)} (required)"
             + (f" and {', '.join(optional)} (optional)" if optional else ""))
    main = required[0]
    by_role = {main: RoleModel(main, "model.onnx", m.sha256, m.size)}
    for f in m.files:
        stem, dot, ext = f.name.rpartition(".")
        if not dot or ext.lower() != "onnx":
            continue
        if stem not in required and stem not in optional:
            raise ManifestError(f"{label}: file {f.name} names no role; its models are "
                                f"<role>.onnx with roles {names}, the {main} model being the "
                                "entry's own artifact")
        if stem == main:
            if f.sha256 != m.sha256:
                raise ManifestError(f"{label}: the {main} model is the entry's own artifact; "
                                    f"file {f.name} is another file (sha256 {f.sha256[:12]}, "
                                    f"the artifact's {m.sha256[:12]})")
            continue
        by_role[stem] = RoleModel(stem, f.name, f.sha256, f.size)
    missing = [r for r in required if r not in by_role]
    if missing:
        raise ManifestError(f"{label}: missing {', '.join(f'{r}.onnx' for r in missing)} in "
                            f"files; its models are {names}: the {main} model is the entry's "
                            "own artifact, the others files named <role>.onnx")
    return [by_role[r] for r in (*required, *optional) if r in by_role]


# File names NAME_RE lets through that are no file's name in a version's folder.
_NOT_FILE_NAMES = frozenset({".", ".."})


def check_model(m: ModelSpec, where: str = "model") -> None:
    """The checks of one manifest entry beyond its types; raises ManifestError (`invalid`).

    `where` is the entry's key path in the manifest (`models[0]`), named by errors about
    one of its fields. Pure: nothing is read or fetched. `edge-fleet deploy` runs them
    before it publishes.
    """
    if m.load == "lazy" and m.task in MULTI_MODEL_TASKS:
        raise ManifestError(
            f"invalid manifest: key '{where}.load': model {m.name}:{m.version} (task "
            f"{m.task}) runs several models and is loaded eagerly; drop `load: lazy`")
    for i, f in enumerate(m.files):
        if f.name in _NOT_FILE_NAMES:
            raise ManifestError(
                f"invalid manifest: key '{where}.files[{i}].name': {f.name!r} is not a file "
                f"name (model {m.name}:{m.version}; a file is stored under its name in the "
                "version's folder)")
    names = [f.name for f in m.files]
    if len(set(names)) != len(names) or "model.onnx" in names:
        raise ManifestError(f"model {m.name}:{m.version}: file names must be unique and "
                            "not model.onnx (the model's own name in its folder)")
    for uri in (m.uri, *(f.uri for f in m.files)):
        _check_uri(m, uri)
    if m.format != "onnx":
        raise ManifestError(f"model {m.name}:{m.version}: unsupported format {m.format!r}")
    _check_health(m)
    why = quantize_problem(m.quantize, m.quantize_calibration, [f.name for f in m.files],
                           m.health is not None and bool(m.health.inputs), m.task)
    if why is not None:
        raise ManifestError(f"invalid manifest: key '{where}.{why[0]}': model {m.name}:"
                            f"{m.version}: {why[1]}")
    if model_roles(m) is not None and m.health is not None and (
            m.health.inputs or m.health.expected):
        raise ManifestError(
            f"model {m.name}:{m.version}: task {m.task} runs several models, each warmed up "
            "on the task's own inputs: health.inputs and health.expected do not apply "
            "(rtol, atol and max_latency_ms do, to each model)")




def check_versions(models: list[ModelSpec]) -> None:
    """The rules across the versions of one name (A/B `traffic`, `shadow`); raises
    ManifestError naming the entry (`models[1].traffic`).

    A name's serving (non-shadow) versions either all give `traffic`, adding up to 100, or
    none does; `traffic` needs two serving versions. A `shadow` has no `traffic`, needs a
    serving version of its name, and a name has at most one shadow.
    """
    by_name: dict[str, list[tuple[int, ModelSpec]]] = {}
    for i, m in enumerate(models):
        by_name.setdefault(m.name, []).append((i, m))
    for name, entries in by_name.items():
        serving = [(i, m) for i, m in entries if not m.shadow]
        shadows = [(i, m) for i, m in entries if m.shadow]
        for i, m in shadows:
            if m.traffic is not None:
                raise ManifestError(f"invalid manifest: key 'models[{i}].traffic': shadow "
                                    f"version {name}:{m.version} gets a copy of each job, "
                                    "not a share: drop traffic or shadow")
            if not serving:
                raise ManifestError(f"invalid manifest: key 'models[{i}].shadow': shadow "
                                    f"version {name}:{m.version} has no serving version of "
                                    f"{name} beside it")
        if len(shadows) > 1:
            raise ManifestError(f"invalid manifest: key 'models[{shadows[1][0]}].shadow': "
                                f"{name} has more than one shadow version")
        weighted = [(i, m) for i, m in serving if m.traffic is not None]
        if not weighted:
            continue
        if len(serving) < 2:
            i, m = weighted[0]
            raise ManifestError(f"invalid manifest: key 'models[{i}].traffic': {name}:"
                                f"{m.version} is the only serving version of {name}; "
                                "traffic splits jobs between two or more")
        for i, m in serving:
            if m.traffic is None:
                raise ManifestError(f"invalid manifest: key 'models[{i}].traffic': missing "
                                    f"for {name}:{m.version} while another version of "
                                    f"{name} gives one")
        total = sum(m.traffic or 0 for _, m in serving)
        if total != TRAFFIC_TOTAL:
            listed = ", ".join(f"{m.version} {m.traffic}" for _, m in serving)
            raise ManifestError(f"invalid manifest: key 'models[{serving[-1][0]}].traffic': "
                                f"the traffic of {name}'s versions adds up to {total}, not "
                                f"{TRAFFIC_TOTAL} ({listed})")


_decoder = msgspec.json.Decoder()


def _check_uri(m: ModelSpec, uri: str) -> None:
    if not _URI_RE.match(uri):
        raise ManifestError(
            f"model {m.name}:{m.version}: unsupported artifact URI {uri!r} "
            "(expected file://, http://, https:// or mqtt:///artifacts/sha256/<hex>)"
        )
    if uri[:5].lower() == "mqtt:" and not MQTT_URI_RE.match(uri):
        raise ManifestError(
            f"model {m.name}:{m.version}: artifact URI {uri!r} must be "
            "mqtt:///artifacts/sha256/<64 hex digits> (no host: the agent's own broker)"
        )


def decode_published(payload: bytes) -> Published:
    """Parse and check a manifest as published; raises ManifestError (reason `invalid`)."""
    try:
        raw = _decoder.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # Bad UTF-8 is a DecodeError in some msgspec releases, a UnicodeDecodeError in others.
        why = not_utf8(payload)
        if why is not None:
            raise ManifestError(f"manifest is not UTF-8: {why}") from None
        raise ManifestError(f"manifest is not valid JSON: {exc}") from None
    except RecursionError:
        raise ManifestError("manifest is nested too deeply") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"manifest must be a JSON object, not {type(raw).__name__}")
    try:
        manifest = convert(raw, Manifest)
    except StructError as exc:
        raise ManifestError(f"invalid manifest: {exc}") from None
    seen: set[tuple[str, str]] = set()
    for i, m in enumerate(manifest.models):
        if m.key in seen:
            raise ManifestError(f"model {m.name} version {m.version} is listed twice")
        seen.add(m.key)
        check_model(m, f"models[{i}]")
    check_versions(manifest.models)
    if manifest.expires_at is not None:
        try:
            parse_rfc3339(manifest.expires_at)
        except ValueError as exc:
            raise ManifestError(f"invalid manifest: expires_at: {exc}") from None
    unsigned = {k: v for k, v in raw.items() if k != "signature"}
    return Published(manifest, canonical_json(unsigned))


def decode_manifest(payload: bytes) -> Manifest:
    """Parse and check a manifest; raises ManifestError with a reason a person can act on."""
    return decode_published(payload).manifest


def canonical_json(obj: Any) -> bytes:
    """The bytes a signature covers: RFC 8785, the JSON Canonicalization Scheme (JCS).

    The one canonical form, for the agent's verifier and edge-fleet's signer alike, and one
    a signer in another language reproduces with its own JCS library: keys sorted by their
    UTF-16 code units, no whitespace, strings in UTF-8 with only the escapes JCS names, and
    numbers as ECMAScript writes them (integers without ".0", 1e+21, 1e-7). `obj` is a
    decoded JSON value, e.g. the manifest object as published, without `signature`.

    Raises ManifestError for a value JCS cannot write the same everywhere: NaN, an
    infinity, or an integer beyond +/-(2**53 - 1), which a JavaScript signer would round.
    """
    try:
        return rfc8785.dumps(obj)
    except rfc8785.CanonicalizationError as exc:
        raise ManifestError(f"manifest has no canonical JSON (RFC 8785): {exc}") from None


def encode_manifest(manifest: Manifest) -> bytes:
    return msgspec.json.encode(manifest)

