"""INT8 at deploy through a real mosquitto and a real agent process: digits deployed with
`quantize: int8` and a calibration file is quantized at deploy and its int8 candidate
measured and judged, with the figures in `reported`; a version whose calibration file does
not fit the model is refused, naming the input and shapes, while the old one keeps serving.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from bench.models import DigitsModel
from edgeinfer.contract.manifest import Manifest, ModelSpec
from edgeinfer.fleet.client import InferenceClient
from tests.broker import Broker
from tests.deploydevice import Device, publish


def artifact(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {"uri": path.as_uri(), "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def digits_spec(model: Path, version: str, calibration: Path) -> ModelSpec:
    return msgspec.convert({
        "name": "digits", "version": version, **artifact(model), "quantize": "int8",
        "quantize_calibration": calibration.name,
        "files": [{"name": calibration.name, **artifact(calibration)}],
    }, ModelSpec)


def test_int8_candidate_is_judged_and_a_bad_calibration_is_refused(
    module_broker: Broker, module_client: InferenceClient, digits: DigitsModel, tmp_path: Path
) -> None:
    good, bad = tmp_path / "cal.npz", tmp_path / "cal-8x8.npz"
    np.savez(good, x=digits.x_test[:200])
    np.savez(bad, x=digits.x_test[:200].reshape(-1, 8, 8))
    dev = Device(tmp_path, module_broker, "gw-int8")
    dev.start()
    try:
        publish(dev, Manifest(revision=1, models=[digits_spec(digits.path, "1", good)]))
        serving = dev.event("model_serving", model="digits", version="1", timeout=60)
        status = next(m for m in dev.reported()["models"] if m["version"] == "1")
        assert status["state"] == "serving"
        cands = {f"{c['runtime']}/{c['device']}/{c['precision']}": c for c in status["candidates"]}
        int8 = cands["onnxruntime/CPU/int8"]
        assert int8["ok"] and isinstance(int8["agreement"], float)
        # The rule: top-1 agreement on the 200 calibration rows against quantize_min_agreement.
        assert int8["agrees"] is (int8["agreement"] >= 0.99)
        assert (int8["p50_ms"] is not None) is int8["agrees"]
        assert "ArrayFeatureExtractor" in cands["openvino/CPU/int8"]["reason"]
        assert serving["precision"] == status["precision"]
        quantized = list((dev.agent.state_dir / "models" / "versions").glob("*/model.int8-*.onnx"))
        assert len(quantized) == 1
        x = digits.x_test[:5]
        result = module_client.infer("digits", {"x": x}, device=dev.id, timeout=20)
        assert result.model_version == "1"
        assert (result.outputs["label"] == digits.sklearn_pred[:5]).mean() >= 0.8

        # A restart reuses the quantized model (and the tuning): nothing is quantized again.
        made = quantized[0].stat().st_mtime_ns
        log_at = len(dev.agent.log_text())
        dev.agent.stop()
        dev.start()
        dev.wait_log(f"int8 model {quantized[0].name}", after=log_at)
        text = dev.wait_log("autotune cache hit", after=log_at)
        assert f"int8 model {quantized[0].name}" in text and "reused" in text
        assert "quantized in" not in text
        assert quantized[0].stat().st_mtime_ns == made

        # Version 2's calibration file is 8x8 images, the model takes rows of 64.
        mark = dev.mark()
        publish(dev, Manifest(revision=2, models=[digits_spec(digits.path, "2", bad)]))
        failed = dev.event("model_failed", model="digits", version="2", after=mark)
        assert failed["stage"] == "quantize"
        assert ("quantize_calibration cal-8x8.npz: input 'x' has shape [200, 8, 8], the model "
                "expects [-1, 64]") in failed["message"]
        dev.version_failed("2", "input 'x' has shape [200, 8, 8]")
        result = module_client.infer("digits", {"x": x}, device=dev.id, timeout=20)
        assert result.model_version == "1"
    finally:
        dev.close()
