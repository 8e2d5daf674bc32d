"""The runtimes edgeinfer knows, by preference name, each backend imported on first use.

A backend whose module fails to import (runtime library missing or broken) is replaced by an
`UnavailableBackend` carrying "runtime X unavailable: <reason>", so that it shows up in
selection attempts and in `edge-agent doctor` instead of silently vanishing.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from edgeinfer.runtimes.base import Backend, LoadOptions, RuntimeLoadError, one_line
from edgeinfer.runtimes.hardware import HardwareInfo

# Preference name -> module exposing BACKEND.
BACKEND_MODULES: dict[str, str] = {
    "cuda": "edgeinfer.runtimes.onnxruntime_cuda",
    "openvino": "edgeinfer.runtimes.openvino_backend",
    "onnxruntime": "edgeinfer.runtimes.onnxruntime_cpu",
}

KNOWN_RUNTIMES: tuple[str, ...] = tuple(BACKEND_MODULES)


@dataclass(frozen=True)
class UnavailableBackend:
    """Stands in for a backend whose module could not be imported."""

    name: str
    reason: str

    def unavailable_reason(self, hw: HardwareInfo) -> str | None:
        return self.reason

    def devices(self, hw: HardwareInfo) -> list[str]:
        return []

    def load(self, path: Path, device: str, options: LoadOptions) -> NoReturn:
        raise RuntimeLoadError(self.reason)


def import_backend(name: str) -> Backend:
    """Import one backend now (no caching); failures become an UnavailableBackend."""
    try:
        module = importlib.import_module(BACKEND_MODULES[name])
    except Exception as exc:  # ImportError, or OSError from a broken shared library
        return UnavailableBackend(
            name, f"runtime {name} unavailable: {type(exc).__name__}: {one_line(exc)}"
        )
    backend: Backend = module.BACKEND
    return backend


_lock = threading.Lock()
_backends: dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    """The backend for a preference name (KeyError for an unknown name), imported once."""
    if name not in BACKEND_MODULES:
        raise KeyError(name)
    with _lock:
        if name not in _backends:
            _backends[name] = import_backend(name)
        return _backends[name]
