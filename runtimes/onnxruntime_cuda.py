"""ONNX Runtime with the CUDA execution provider, one NVIDIA GPU per session ("cuda:<index>").

ORT quietly runs a session on the CPU when the CUDA provider cannot start (provider not in
this build, CUDA/cuDNN libraries missing): it only logs. A model reported as running on
"cuda" must really be on the GPU, so such a session is refused here and selection falls
back down the preference list instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from edgeinfer.runtimes.base import LoadOptions, RuntimeLoadError
from edgeinfer.runtimes.hardware import HardwareInfo
from edgeinfer.runtimes.ort_common import OrtSession, open_session

PROVIDER = "CUDAExecutionProvider"


def _device_index(device: str) -> int:
    prefix, _, index = device.partition(":")
    if prefix != "cuda" or not index.isdigit():
        raise RuntimeLoadError(f"cuda device must look like 'cuda:0', got {device!r}")
    return int(index)


# onnxruntime-gpu and onnxruntime install the same module: the GPU build replaces the CPU one.
GPU_INSTALL_HINT = ("install onnxruntime-gpu in place of onnxruntime: the agent-gpu extra, "
                    "deploy/install.sh --gpu")


@dataclass(frozen=True)
class OnnxRuntimeCudaBackend:
    name: str = "cuda"

    def unavailable_reason(self, hw: HardwareInfo) -> str | None:
        if error := hw.runtime_error("onnxruntime"):
            return error
        if not hw.nvidia_gpus:
            return "no NVIDIA GPU detected"
        if PROVIDER not in hw.ort_providers:
            return f"onnxruntime has no {PROVIDER} ({GPU_INSTALL_HINT})"
        return None

    def devices(self, hw: HardwareInfo) -> list[str]:
        if self.unavailable_reason(hw):
            return []
        return [f"cuda:{gpu.index}" for gpu in hw.nvidia_gpus]

    def load(self, path: Path, device: str, options: LoadOptions) -> OrtSession:
        index = _device_index(device)
        # Checked before creating the session: ORT would otherwise warn and use the CPU.
        available = ort.get_available_providers()
        if PROVIDER not in available:
            raise RuntimeLoadError(
                f"this onnxruntime build has no {PROVIDER} "
                f"(it has {', '.join(available)}); {GPU_INSTALL_HINT}"
            )
        # ORT appends the CPU provider itself, for the few nodes CUDA has no kernel for;
        # that is normal. What is not: CUDA failing to start, leaving only the CPU.
        # use_tf32 off: ONNX Runtime turns TF32 on by default for matmuls and convolutions on
        # Ampere and newer, which rounds f32 inputs to 10 mantissa bits. Measured on an H200
        # (ORT 1.31, the repo's CNN): 7.5e-4 away from the CPU with it, 5e-7 without. A
        # candidate called f32 computes in f32, so it agrees with the CPU reference.
        session = open_session(path, [(PROVIDER, {"device_id": index, "use_tf32": "0"})], options)
        if PROVIDER not in session.get_providers():
            raise RuntimeLoadError(
                f"onnxruntime could not start {PROVIDER} on {device} and fell back to "
                f"{', '.join(session.get_providers())}; check the CUDA and cuDNN libraries "
                "against the onnxruntime-gpu requirements"
            )
        return OrtSession(self.name, device, session)


BACKEND = OnnxRuntimeCudaBackend()
