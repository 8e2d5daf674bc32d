"""What this machine offers for inference: CPU, memory, NVIDIA GPUs, runtimes and their devices.

`HardwareInfo` is the seam tests fake: every selection function takes one as an argument,
and only `detect()` looks at the real machine. Runtime libraries are imported inside the
probes so that a broken install is recorded as "runtime X unavailable: <reason>" instead
of breaking detection (or vanishing without a word).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Flags that decide which kernels a runtime can use; summary() reports only these so that
# the reported state stays small (a modern x86 CPU lists well over a hundred flags).
_NOTABLE_FLAGS = frozenset(
    {
        "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni",
        "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8", "amx_fp16",
        "neon", "asimd", "asimdhp", "asimddp", "sve", "sve2", "i8mm", "bf16",
    }
)  # fmt: skip

_NVIDIA_SMI_TIMEOUT_S = 10.0  # a wedged driver makes nvidia-smi hang; never block startup on it


@dataclass(frozen=True)
class NvidiaGpu:
    index: int
    name: str
    memory_mb: int | None  # None when only /proc/driver/nvidia was readable


@dataclass(frozen=True)
class HardwareInfo:
    cpu_model: str = ""
    cores_physical: int = 1
    cores_logical: int = 1
    cpu_flags: tuple[str, ...] = ()
    memory_bytes: int = 0
    ort_providers: tuple[str, ...] = ()
    ort_version: str = ""
    openvino_devices: tuple[str, ...] = ()
    # (device, FULL_DEVICE_NAME) pairs: a tuple rather than a dict keeps the value hashable.
    openvino_device_names: tuple[tuple[str, str], ...] = ()
    openvino_version: str = ""
    nvidia_gpus: tuple[NvidiaGpu, ...] = ()
    errors: tuple[str, ...] = ()  # "runtime X unavailable: reason", probe failures

    def openvino_device_name(self, device: str) -> str:
        return dict(self.openvino_device_names).get(device, device)

    def runtime_error(self, library: str) -> str | None:
        """The recorded "runtime <library> unavailable: ..." line, if any."""
        prefix = f"runtime {library} unavailable:"
        return next((e for e in self.errors if e.startswith(prefix)), None)

    def summary(self) -> dict[str, Any]:
        """Compact, JSON-able description for the agent's reported state."""
        return {
            "cpu": {
                "model": self.cpu_model,
                "cores_physical": self.cores_physical,
                "cores_logical": self.cores_logical,
                "flags": sorted(f for f in self.cpu_flags if f in _NOTABLE_FLAGS),
            },
            "memory_mb": self.memory_bytes // (1024 * 1024),
            "nvidia_gpus": [
                {"index": g.index, "name": g.name, "memory_mb": g.memory_mb}
                for g in self.nvidia_gpus
            ],
            "onnxruntime": {"version": self.ort_version, "providers": list(self.ort_providers)},
            "openvino": {
                "version": self.openvino_version,
                "devices": {d: self.openvino_device_name(d) for d in self.openvino_devices},
            },
            "errors": list(self.errors),
        }


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _cpuinfo() -> tuple[str, tuple[str, ...], int | None]:
    """Model name, flags and physical core count from /proc/cpuinfo (x86 and ARM spellings)."""
    model = ""
    flags: set[str] = set()
    cores: set[tuple[str, str]] = set()
    physical_id = "0"
    for line in _read_text(Path("/proc/cpuinfo")).splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("model name", "Model", "Hardware") and not model:
            model = value
        elif key in ("flags", "Features"):
            flags.update(value.split())
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            cores.add((physical_id, value))
    return (
        model or platform.processor() or platform.machine(),
        tuple(sorted(flags)),
        (len(cores) or None),
    )


def _logical_cores() -> int:
    # The CPUs this process may run on (cgroups/taskset), not all the host has.
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _memory_bytes() -> int:
    for line in _read_text(Path("/proc/meminfo")).splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            return int(parts[1]) * 1024
    # Not Linux, or /proc not mounted. psutil is imported only here: `edge-fleet` and the job
    # client import this module (through runtimes.pipelines) without the agent extra.
    import psutil  # noqa: PLC0415

    return int(psutil.virtual_memory().total)


def _nvidia_smi(errors: list[str]) -> tuple[NvidiaGpu, ...] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        proc = subprocess.run(
            [exe, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=_NVIDIA_SMI_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        errors.append(f"nvidia-smi failed: {exc}")
        return None
    if proc.returncode != 0:
        errors.append(f"nvidia-smi failed: {(proc.stderr or proc.stdout).strip()[:200]}")
        return None
    gpus = []
    for line in proc.stdout.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 3:
            continue
        try:
            # A GPU name may itself contain commas: index first, memory last, name between.
            gpus.append(NvidiaGpu(int(fields[0]), ", ".join(fields[1:-1]), int(fields[-1])))
        except ValueError:
            errors.append(f"nvidia-smi: cannot parse {line!r}")
    return tuple(gpus)


def _proc_nvidia() -> tuple[NvidiaGpu, ...]:
    """GPUs the kernel driver knows, when nvidia-smi is missing (e.g. a minimal container)."""
    root = Path("/proc/driver/nvidia/gpus")
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return ()
    gpus = []
    for position, entry in enumerate(entries):
        info: dict[str, str] = {}
        for line in _read_text(entry / "information").splitlines():
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
        index = int(info["Device Minor"]) if info.get("Device Minor", "").isdigit() else position
        gpus.append(NvidiaGpu(index, info.get("Model", "NVIDIA GPU"), None))
    return tuple(gpus)


def _probe_onnxruntime(errors: list[str]) -> tuple[tuple[str, ...], str]:
    try:
        import onnxruntime as ort  # noqa: PLC0415 - here, so a broken install is recorded

        return tuple(ort.get_available_providers()), str(ort.__version__)
    except Exception as exc:  # ImportError, or a broken shared library (OSError)
        errors.append(f"runtime onnxruntime unavailable: {type(exc).__name__}: {exc}")
        return (), ""


def _probe_openvino(errors: list[str]) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...], str]:
    try:
        import openvino as ov  # noqa: PLC0415 - here, so a broken install is recorded

        core = ov.Core()
        devices = tuple(core.available_devices)
        version = str(ov.get_version())
    except Exception as exc:
        errors.append(f"runtime openvino unavailable: {type(exc).__name__}: {exc}")
        return (), (), ""
    names = []
    for device in devices:
        try:
            names.append((device, str(core.get_property(device, "FULL_DEVICE_NAME"))))
        except Exception as exc:  # one odd plugin must not hide the others
            errors.append(f"openvino device {device}: no FULL_DEVICE_NAME: {exc}")
    return devices, tuple(names), version


def _detect() -> HardwareInfo:
    errors: list[str] = []
    model, flags, physical = _cpuinfo()
    logical = _logical_cores()
    gpus = _nvidia_smi(errors)
    if gpus is None:
        gpus = _proc_nvidia()
    providers, ort_version = _probe_onnxruntime(errors)
    ov_devices, ov_names, ov_version = _probe_openvino(errors)
    return HardwareInfo(
        cpu_model=model,
        # /proc/cpuinfo lists the whole host even when a cgroup grants us two CPUs.
        cores_physical=min(physical or logical, logical),
        cores_logical=logical,
        cpu_flags=flags,
        memory_bytes=_memory_bytes(),
        ort_providers=providers,
        ort_version=ort_version,
        openvino_devices=ov_devices,
        openvino_device_names=ov_names,
        openvino_version=ov_version,
        nvidia_gpus=gpus,
        errors=tuple(errors),
    )


_lock = threading.Lock()
_cached: HardwareInfo | None = None


def detect(refresh: bool = False) -> HardwareInfo:
    """Probe the machine once, then answer from the cache (OpenVINO enumerating its device
    plugins makes a probe take a fraction of a second, longer with GPU drivers)."""
    global _cached  # noqa: PLW0603 - a process-wide cache is the point
    with _lock:
        if _cached is None or refresh:
            _cached = _detect()
        return _cached
