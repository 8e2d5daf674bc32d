"""What the daemon needs beyond the base install, and the line that says how to get it.

`pip install edgeinfer` is the job client and `edge-fleet`: no inference runtime. The
daemon needs the `agent` extra (ONNX Runtime and OpenVINO) or `agent-gpu` (ONNX Runtime's
CUDA build and OpenVINO); without them `edge-agent run` stops with this line instead of an
ImportError deep inside a model load.
"""

from __future__ import annotations

from importlib.util import find_spec

# Modules the daemon imports whatever its models: the machine's readings, metrics, job ids.
_ALWAYS = ("psutil", "prometheus_client", "xxhash", "mqtt5")
# At least one of these runs the models (runtimes/hardware.py probes both).
_RUNTIMES = ("onnxruntime", "openvino")

INSTALL_HINT = (
    "pip install 'edgeinfer[agent]' (ONNX Runtime and OpenVINO), or 'edgeinfer[agent-gpu]' "
    "on an NVIDIA gateway; deploy/install.sh does this"
)


def missing_for_agent() -> str | None:
    """None when the daemon can run here, else one line naming what is missing."""
    missing = [name for name in _ALWAYS if find_spec(name) is None]
    if not any(find_spec(name) is not None for name in _RUNTIMES):
        missing.append(" or ".join(_RUNTIMES))
    if not missing:
        return None
    return f"the agent's packages are not installed ({', '.join(missing)} missing): {INSTALL_HINT}"
