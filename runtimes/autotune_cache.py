"""The auto-tuner's cache: `state_dir/autotune.json`, tuning outcomes by cache key (model
sha256, candidate set, hardware fingerprint, tolerance, threads; runtimes/autotune.py's
cache_key), the newest MAX_CACHE_ENTRIES kept, written atomically. An unreadable file or
one of another CACHE_VERSION reads as empty: the model is tuned again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from edgeinfer.runtimes.hardware import HardwareInfo

log = logging.getLogger(__name__)

MAX_CACHE_ENTRIES = 256
CACHE_VERSION = 1


def hardware_fingerprint(hw: HardwareInfo) -> str:
    """What of the machine a tuning outcome depends on (CPU, GPUs, runtime versions and
    devices), hashed: another machine, or an upgraded runtime, tunes again."""
    doc = {
        "cpu": hw.cpu_model,
        "flags": sorted(hw.cpu_flags),
        "cores": hw.cores_logical,
        "gpus": [g.name for g in hw.nvidia_gpus],
        "ort": hw.ort_version,
        "ort_providers": list(hw.ort_providers),
        "openvino": hw.openvino_version,
        "openvino_devices": list(hw.openvino_device_names),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


class AutotuneCache:
    """`state_dir/autotune.json`: tuning outcomes by cache key, written atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def _read(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("%s unreadable (%s); tuning again", self.path, exc)
            return {}
        if not isinstance(doc, dict) or doc.get("version") != CACHE_VERSION:
            return {}
        entries = doc.get("entries")
        return entries if isinstance(entries, dict) else {}

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            entry = self._read().get(key)
        return entry if isinstance(entry, dict) else None

    def put(self, key: str, entry: dict[str, Any]) -> None:
        with self._lock:
            entries = self._read()
            entries.pop(key, None)
            entries[key] = entry  # newest last; the oldest go first past the bound
            while len(entries) > MAX_CACHE_ENTRIES:
                entries.pop(next(iter(entries)))
            data = json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1).encode()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".autotune.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
