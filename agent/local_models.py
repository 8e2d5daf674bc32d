"""Models served from a folder on the gateway (`models.local_dir`): no fleet needed.

`<local_dir>/<name>/<version>/` holds the model (`model.onnx`, or the folder's only `.onnx`
file) and an optional `model.yaml` with the manifest entry's other fields (task, runtime,
batching, instances, health, settings, files). Every other file of the folder is a side
file installed beside the model (unless model.yaml's `files` lists which). Each version
folder becomes the ModelSpec a manifest would carry, with a `file://` URI and the sha256
and size of the file as read here, so the reconciler fetches it into the store and
verifies it, loads it, gates and swaps it exactly like a deployed one.

The folder is watched by polling, not inotify (no dependency, and it works on any file
system): every `models.scan_interval_s` each version folder's listing (names, sizes,
mtimes) is compared with the last one, and a folder is read only once two looks in a row
agree: a half-copied file is never taken. A folder being changed keeps its last stable
reading until it settles.

Which version serves: the newest by natural order of the version folders' names (2 < 10,
v9 < v10) that comes up; a newer one that fails falls back to the next. A folder that
cannot be read as a model version is refused with the reason (agent/reconciler.py reports
it), and the rest keep serving.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeinfer.configfile import ConfigError, read_yaml_mapping
from edgeinfer.contract.manifest import ManifestError, ModelSpec, check_model
from edgeinfer.contract.topics import NAME_RE
from edgeinfer.structcheck import StructError, convert

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
MODEL_YAML = "model.yaml"
# model.yaml's keys: the manifest entry's fields the folder does not already say (name and
# version are the folders' names; uri, sha256 and size come from the file).
YAML_KEYS = ("task", "runtime", "batching", "instances", "health", "settings", "files")

# (file name, size or -1 for what is not a file, mtime in ns), sorted: a folder's listing.
Snapshot = tuple[tuple[str, int, int], ...]


class LocalModelError(ValueError):
    """A version folder that is not a model version; the message names the folder and why."""


@dataclass(frozen=True)
class LocalVersion:
    spec: ModelSpec
    folder: Path


@dataclass(frozen=True)
class Refusal:
    """A folder under local_dir that is not served; `message` names it and says why."""

    folder: Path
    message: str
    model: str | None = None
    version: str | None = None
    # "invalid" (not a model version), "conflict" (the name is the fleet manifest's too),
    # "load" (fetch, load or health gate failed: agent/bring_up.py's message).
    reason: str = "invalid"
    revision: int | None = None  # a conflict's manifest revision


@dataclass(frozen=True)
class LocalScan:
    """What the folder offers: each name's versions, newest first, and what was refused."""

    root: Path
    versions: dict[str, list[LocalVersion]] = field(default_factory=dict)
    refused: list[Refusal] = field(default_factory=list)


def natural_key(text: str) -> tuple[tuple[int, int, str], ...]:
    """Orders names with their digit runs as numbers: 2 < 10, v9 < v10, 1.2 < 1.10."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", text) if part)


def snapshot(folder: Path) -> Snapshot:
    """The folder's listing (hidden entries left out); raises OSError."""
    entries = []
    for entry in folder.iterdir():
        if entry.name.startswith("."):
            continue  # editors' and copy tools' temporary files
        st = entry.stat()
        entries.append((entry.name, st.st_size if entry.is_file() else -1, st.st_mtime_ns))
    return tuple(sorted(entries))


class Hashes:
    """sha256 of files, remembered by (size, mtime): a stable folder is hashed once."""

    def __init__(self) -> None:
        self._known: dict[Path, tuple[int, int, str]] = {}

    def of(self, path: Path) -> tuple[str, int]:
        st = path.stat()
        known = self._known.get(path)
        if known is not None and known[:2] == (st.st_size, st.st_mtime_ns):
            return known[2], st.st_size
        with path.open("rb") as f:
            sha = hashlib.file_digest(f, "sha256").hexdigest()
        self._known[path] = (st.st_size, st.st_mtime_ns, sha)
        return sha, st.st_size

    def keep_only(self, paths: set[Path]) -> None:
        self._known = {p: v for p, v in self._known.items() if p in paths}


def _model_file(folder: Path, names: list[str]) -> str:
    if MODEL_FILE in names:
        return MODEL_FILE
    onnx = [n for n in names if n.lower().endswith(".onnx")]
    if len(onnx) == 1:
        return onnx[0]
    if not onnx:
        raise LocalModelError(f"{folder}: no model file (put the model in it as {MODEL_FILE})")
    raise LocalModelError(f"{folder}: several .onnx files ({', '.join(onnx)}) and no "
                          f"{MODEL_FILE}: name the model {MODEL_FILE}")


def _options(folder: Path) -> dict[str, Any]:
    path = folder / MODEL_YAML
    try:
        options = read_yaml_mapping(path)
    except ConfigError as exc:
        raise LocalModelError(str(exc)) from None
    for key in options:
        if key not in YAML_KEYS:
            raise LocalModelError(f"{path}: key {key!r} is not a model.yaml key (known keys: "
                                  f"{', '.join(YAML_KEYS)}; name and version are the folders' "
                                  "names, the model file gives the rest)")
    return options


def _side_files(folder: Path, names: list[str], model: str, listed: Any) -> list[str]:
    if listed is None:
        return [n for n in names if n not in (model, MODEL_YAML)]
    where = f"{folder / MODEL_YAML}: key 'files'"
    if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
        raise LocalModelError(f"{where}: must be a list of the folder's file names")
    for n in listed:
        if n not in names:
            raise LocalModelError(f"{where}: {n!r} is not a file of the folder")
        if n in (model, MODEL_YAML):
            raise LocalModelError(f"{where}: {n!r} is the model or model.yaml, not a side file")
    return list(listed)


def read_version(folder: Path, name: str, version: str, hashes: Hashes) -> ModelSpec:
    """The ModelSpec of one version folder; raises LocalModelError naming the folder and
    the problem, or OSError when the folder cannot be read."""
    listing = snapshot(folder)
    not_files = [n for n, size, _ in listing if size < 0]
    if not_files:
        raise LocalModelError(f"{folder}: {', '.join(not_files)} is not a file (a version "
                              "folder holds the model and its files, no folders)")
    names = [n for n, _, _ in listing]
    model = _model_file(folder, names)
    options = _options(folder) if MODEL_YAML in names else {}
    side = _side_files(folder, names, model, options.pop("files", None))
    for n in (model, *side):
        if (folder / n).stat().st_size == 0:
            raise LocalModelError(f"{folder}: {n} is empty")
    sha, size = hashes.of(folder / model)
    files = []
    for n in side:
        file_sha, file_size = hashes.of(folder / n)
        files.append({"name": n, "uri": (folder / n).as_uri(), "sha256": file_sha,
                      "size": file_size})
    raw = {"name": name, "version": version, "uri": (folder / model).as_uri(), "sha256": sha,
           "size": size, **options, "files": files}
    source = folder / MODEL_YAML if options else folder
    try:
        spec = convert(raw, ModelSpec)
        check_model(spec)
    except StructError as exc:
        raise LocalModelError(f"{source}: {exc}") from None
    except ManifestError as exc:
        raise LocalModelError(f"{source}: {exc}") from None
    return spec


def split_conflicts(scan: LocalScan | None, fleet_names: set[str], revision: int | None
                    ) -> tuple[dict[str, list[LocalVersion]], list[Refusal]]:
    """The local versions to bring up, by name, and what is refused: the scan's refusals
    and each name that the fleet's manifest (`revision`) also holds. The manifest wins: its
    version keeps serving, the folder's is refused until one of them is renamed."""
    if scan is None:
        return {}, []
    wanted: dict[str, list[LocalVersion]] = {}
    refused = list(scan.refused)
    which = "the fleet's manifest" if revision is None else f"manifest revision {revision}"
    for name, versions in scan.versions.items():
        if name not in fleet_names:
            wanted[name] = versions
            continue
        folder = versions[0].folder.parent
        refused.append(Refusal(
            folder, f"model {name} is both in {folder} and in {which}: the manifest's "
            f"{name} serves, the folder's is refused (rename one of them)", name,
            reason="conflict", revision=revision))
    return wanted, refused


class Refusals:
    """Reports each refusal once as a `local_model_refused` event, however often the
    folder is looked at (and again if it comes back after a change)."""

    def __init__(self, emit: Callable[..., None]) -> None:
        self._emit = emit
        self._reported: set[Refusal] = set()

    def report(self, refused: list[Refusal]) -> None:
        for r in refused:
            if r not in self._reported:
                log.warning("local model refused: %s", r.message)
                self._emit("local_model_refused", model=r.model, version=r.version,
                           folder=str(r.folder), reason=r.reason, revision=r.revision,
                           message=r.message)
        self._reported = set(refused)


class LocalFolder:
    """Reads `root` into a LocalScan, taking a version folder once it is stable."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._hashes = Hashes()
        self._seen: dict[Path, Snapshot] = {}  # each version folder's listing at the last look
        # Each version folder's last stable listing and what it was read as.
        self._taken: dict[Path, tuple[Snapshot, LocalVersion | Refusal]] = {}

    def scan(self) -> LocalScan:
        result = LocalScan(self.root)
        if not self.root.is_dir():
            result.refused.append(Refusal(self.root, f"models.local_dir {self.root} is not a "
                                          "folder: nothing is served from it until it is"))
            self._seen, self._taken = {}, {}
            return result
        seen: dict[Path, Snapshot] = {}
        taken: dict[Path, tuple[Snapshot, LocalVersion | Refusal]] = {}
        for name_dir in self._entries(self.root, result, "model"):
            for folder in self._entries(name_dir, result, f"{name_dir.name} version"):
                try:
                    snap = snapshot(folder)
                except OSError:
                    continue  # removed while we looked: gone at the next look
                seen[folder] = snap
                before = self._taken.get(folder)
                if before is not None and before[0] == snap:
                    taken[folder] = before
                elif self._seen.get(folder) == snap:  # stable across two looks: read it
                    taken[folder] = (snap, self._read(folder, name_dir.name))
                elif before is not None:
                    taken[folder] = before  # changing: its last stable reading stands
        self._seen, self._taken = seen, taken
        self._hashes.keep_only({folder / n for folder, snap in seen.items() for n, _, _ in snap})
        for _, got in taken.values():
            if isinstance(got, Refusal):
                result.refused.append(got)
            else:
                result.versions.setdefault(got.spec.name, []).append(got)
        for versions in result.versions.values():
            versions.sort(key=lambda v: natural_key(v.spec.version), reverse=True)
        result.refused.sort(key=lambda r: str(r.folder))
        return result

    def _entries(self, parent: Path, result: LocalScan, what: str) -> list[Path]:
        """The folders under `parent` whose names are model names or versions; others are
        refused (hidden entries are left alone)."""
        try:
            entries = sorted(parent.iterdir())
        except OSError as exc:
            result.refused.append(Refusal(parent, f"{parent}: cannot be read ({exc.strerror})"))
            return []
        out = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if not entry.is_dir():
                result.refused.append(Refusal(
                    entry, f"{entry}: not a folder (expected <name>/<version>/ folders)"))
            elif not NAME_RE.match(entry.name):
                result.refused.append(Refusal(
                    entry, f"{entry}: {entry.name!r} is no {what} name (letters, digits, "
                    "'.', '_' and '-', up to 64)"))
            else:
                out.append(entry)
        return out

    def _read(self, folder: Path, name: str) -> LocalVersion | Refusal:
        try:
            return LocalVersion(read_version(folder, name, folder.name, self._hashes), folder)
        except LocalModelError as exc:
            return Refusal(folder, str(exc), name, folder.name)
        except OSError as exc:
            return Refusal(folder, f"{folder}: cannot be read ({exc.strerror or exc})", name,
                           folder.name)


class LocalModels:
    """Watches the folder on a thread of its own; hands each changed LocalScan over."""

    def __init__(self, root: Path, interval_s: float,
                 on_change: Callable[[LocalScan], None]) -> None:
        self.folder = LocalFolder(root)
        self._interval_s = interval_s
        self._on_change = on_change
        self._last: tuple[Any, ...] | None = None
        self.last_scan = LocalScan(root)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def look(self) -> LocalScan | None:
        """Look at the folder once; the scan when it differs from the last handed over."""
        scan = self.last_scan = self.folder.scan()
        key = (tuple((n, tuple((v.spec, v.folder) for v in vs))
                     for n, vs in sorted(scan.versions.items())),
               tuple(scan.refused))
        if key == self._last:
            return None
        self._last = key
        return scan

    def settle(self) -> LocalScan:
        """Two looks a scan interval apart, at start: what the folder holds then is served
        before the agent says it is ready (as the models restored from the store are)."""
        self.look()
        self._stop.wait(self._interval_s)
        self.look()
        return self.last_scan

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="local-models", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                scan = self.look()
                if scan is not None:
                    self._on_change(scan)
            except Exception:
                log.exception("looking at %s failed", self.folder.root)
            self._stop.wait(self._interval_s)
