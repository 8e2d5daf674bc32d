"""The job client SDK: OIP v2 inference jobs over MQTT v5 request/response.

One connection, one reply topic (`{prefix}/reply/{client_id}/res`) subscribed once;
each job carries a unique Correlation Data that its response echoes, so any number
of jobs can be in flight at once.

    with InferenceClient("mqtt://gateway:1883") as client:
        result = client.infer("digits", {"x": batch}, device="gw-1")
        print(result.outputs["label"], result.parameters["runtime"])
        for part in client.stream("llm", {"prompt": text}, device="gw-1"):
            ...  # each response of a streamed job, the last one says sequence_end: true
        meta = client.metadata("digits", device="gw-1")  # inputs, outputs: name, datatype, shape
        client.ready("digits", device="gw-1")  # True when a job would run now

This module is the SDK's public face: an application imports everything from here.
`InferenceClient` (fleet/sync_client.py) sends jobs from threads; `AsyncInferenceClient`
(fleet/aio.py) is the asyncio flavour over it; the errors are fleet/errors.py's.

Threads: paho's network thread only hands responses to a queue. A worker thread
(fleet/pending.py) decodes them, resolves the futures and fails those past their timeout,
so a slow `add_done_callback` never stalls the MQTT connection (it delays other results).
"""

from __future__ import annotations

from edgeinfer.contract.documents import TensorMetadata
from edgeinfer.contract.queries import ModelMetadata, QueryKind
from edgeinfer.fleet.aio import AsyncInferenceClient
from edgeinfer.fleet.errors import (
    DeadlineExceeded,
    InferenceError,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from edgeinfer.fleet.oip import InferResult
from edgeinfer.fleet.streams import ResponseStream
from edgeinfer.fleet.sync_client import InferenceClient

__all__ = [
    "AsyncInferenceClient",
    "DeadlineExceeded",
    "InferResult",
    "InferenceClient",
    "InferenceError",
    "Internal",
    "InvalidArgument",
    "ModelMetadata",
    "NotFound",
    "QueryKind",
    "ResourceExhausted",
    "ResponseStream",
    "TensorMetadata",
    "Unavailable",
]
