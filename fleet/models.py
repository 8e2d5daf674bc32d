"""`edge-fleet models`: model versions in the artifact store and the registry.

A push hashes the file, checks the registry (a name:version names one set of bytes
forever), copies the file into the content-addressed artifact store and records it.
The CLI talks to the registry directly (the same storage layer the controller uses), so
pushing works whether or not a controller runs; SQLite in WAL mode lets both share a file.
`describe` asks a device instead (OIP's model metadata over MQTT); its table is here too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from edgeinfer.contract.queries import ModelMetadata
from edgeinfer.contract.topics import NAME_RE
from edgeinfer.fleet.artifacts import ArtifactStore
from edgeinfer.fleet.registry import ModelConflict, ModelVersion, Registry, RegistryError

_CHUNK = 1 << 20


@dataclass(frozen=True)
class PushOutcome:
    model: ModelVersion
    created: bool  # False: the same bytes were there already, nothing changed


def file_digest(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def check_push(path: Path, *, name: str, version: str, task: str = "tensor",
               labels: Path | None = None) -> None:
    """RegistryError for a push that cannot succeed, found without opening anything: the
    CLI calls it before it opens (and so maybe creates) the registry."""
    for what, value in (("name", name), ("version", version), ("task", task)):
        if not NAME_RE.match(value):
            raise RegistryError(f"model {what} {value!r} must match {NAME_RE.pattern}")
    for file in (path, labels):
        if file is not None and not file.is_file():
            raise RegistryError(f"no such file: {file}")


def push_model(registry: Registry, store: ArtifactStore, path: Path, *, name: str,
               version: str, task: str = "tensor", labels: Path | None = None) -> PushOutcome:
    """Raises ModelConflict (other bytes under name:version), RegistryError, OSError."""
    check_push(path, name=name, version=version, task=task, labels=labels)
    sha, size = file_digest(path)
    labels_sha = file_digest(labels)[0] if labels is not None else None
    wanted = ModelVersion(name, version, sha, size, task, "onnx", labels_sha)
    existing = registry.model(name, version)
    if existing is not None:
        if existing.same_content(wanted):
            return PushOutcome(existing, created=False)
        # Checked before copying: a refused push leaves nothing in the store.
        registry.add_model(wanted)  # raises ModelConflict with the stored digest
        raise ModelConflict(f"model {name}:{version} already exists")  # pragma: no cover
    stored = store.put_file(path)
    if stored.sha256 != sha:
        raise RegistryError(f"{path} changed while it was pushed: try again")
    if labels is not None:
        store.put_file(labels)
    model, created = registry.add_model(wanted)
    return PushOutcome(model, created)


def format_models_table(models: list[ModelVersion]) -> str:
    header = ("NAME", "VERSION", "TASK", "SIZE", "SHA256", "LABELS", "CREATED")
    lines = [header] + [
        (m.name, m.version, m.task, str(m.size), m.sha256[:12],
         m.labels_sha256[:12] if m.labels_sha256 else "-", m.created_at)
        for m in models
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def format_metadata_table(meta: ModelMetadata) -> str:
    """A model's inputs and outputs as OIP's metadata gives them, one row each (shape -1:
    any size), under a line naming its served versions and platform."""
    header = ("", "NAME", "DATATYPE", "SHAPE")
    rows = [header] + [
        (kind, t.name, t.datatype, "[" + ", ".join(str(d) for d in t.shape) + "]")
        for kind, tensors in (("input", meta.inputs), ("output", meta.outputs))
        for t in tensors
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [f"{meta.name}: versions {', '.join(meta.versions)}; platform {meta.platform}"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
              for row in rows]
    return "\n".join(lines)
