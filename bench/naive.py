"""The naive baseline: ONNX Runtime called inside paho's on_message.

What one writes first: a paho subscriber (MQTT v5, TCP_NODELAY set, so the comparison is
not about Nagle) that decodes a JSON request whose tensors are base64 strings, runs the
model on paho's network thread, and publishes a JSON answer with base64 outputs at QoS 1
to the Response Topic with the Correlation Data. One job at a time, no queue, no journal.

    request: {"id": "...", "inputs": {"image": {"dtype": "float32", "shape": [1, 3, 224, 224],
                                                "b64": "..."}}}
    answer:  {"id": "...", "outputs": {"logits": {"dtype": ..., "shape": ..., "b64": ...}}}

    python -m bench.naive mqtt://127.0.0.1:1883 model.onnx --device naive-gw
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.responder import serve

READY = "naive ready"


def encode_tensors(arrays: dict[str, np.ndarray[Any, Any]]) -> dict[str, Any]:
    return {name: {"dtype": str(a.dtype), "shape": list(a.shape),
                   "b64": base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()}
            for name, a in arrays.items()}


def decode_tensors(doc: dict[str, Any]) -> dict[str, np.ndarray[Any, Any]]:
    return {name: np.frombuffer(base64.b64decode(t["b64"]), dtype=t["dtype"]).reshape(t["shape"])
            for name, t in doc.items()}


def request_body(job_id: str, inputs: dict[str, np.ndarray[Any, Any]]) -> bytes:
    return json.dumps({"id": job_id, "inputs": encode_tensors(inputs)}).encode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run ONNX Runtime inside paho's on_message")
    parser.add_argument("broker")
    parser.add_argument("model", type=Path)
    parser.add_argument("--device", default="naive-gw")
    parser.add_argument("--prefix", default="edge/v1")
    args = parser.parse_args(argv)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(str(args.model), sess_options=so,
                                   providers=["CPUExecutionProvider"])
    output_names = [o.name for o in session.get_outputs()]

    def on_message(c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        req = msg.properties
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        correlation = getattr(req, "CorrelationData", None)
        if correlation is not None:
            props.CorrelationData = correlation
        reply = getattr(req, "ResponseTopic", None) or f"{args.prefix}/dev/{args.device}/results"
        try:
            doc = json.loads(msg.payload)
            results = session.run(output_names, decode_tensors(doc["inputs"]))
            answer = {"id": doc.get("id"),
                      "outputs": encode_tensors(dict(zip(output_names, results, strict=True)))}
        except Exception as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        c.publish(reply, json.dumps(answer).encode(), qos=1, properties=props)

    return serve(args.broker, f"bench-naive-{args.device}",
                 [f"{args.prefix}/dev/{args.device}/jobs"], on_message, ready=READY)


if __name__ == "__main__":
    sys.exit(main())
