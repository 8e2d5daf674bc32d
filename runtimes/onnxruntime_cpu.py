"""ONNX Runtime on the CPU: the runtime of last resort, since it runs every standard ONNX op
(ai.onnx.ml included)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeinfer.runtimes.base import LoadOptions, RuntimeLoadError
from edgeinfer.runtimes.hardware import HardwareInfo
from edgeinfer.runtimes.ort_common import OrtSession, open_session

PROVIDER = "CPUExecutionProvider"


@dataclass(frozen=True)
class OnnxRuntimeCpuBackend:
    name: str = "onnxruntime"

    def unavailable_reason(self, hw: HardwareInfo) -> str | None:
        if PROVIDER in hw.ort_providers:
            return None
        return hw.runtime_error("onnxruntime") or f"onnxruntime lists no {PROVIDER}"

    def devices(self, hw: HardwareInfo) -> list[str]:
        return [] if self.unavailable_reason(hw) else ["CPU"]

    def load(self, path: Path, device: str, options: LoadOptions) -> OrtSession:
        if device != "CPU":
            raise RuntimeLoadError(f"onnxruntime (CPU) has no device {device!r}; use CPU")
        return OrtSession(self.name, device, open_session(path, [PROVIDER], options))


BACKEND = OnnxRuntimeCpuBackend()
