"""OIP v2 (KServe v2) requests and responses over MQTT, with Triton's binary extension:
the agent's job codec.

Decoding turns a payload into a `RawRequest` (agent/protocol/request.py), whose tensors
`check_inputs` turns into numpy arrays checked against the model's declared inputs
(agent/protocol/inputs.py), so the runtime never sees a bad tensor. Every problem is a
`JobError` with a message that names it. Answers are written by agent/protocol/answer.py;
the binary section both ways is agent/protocol/binary.py's.
"""

from edgeinfer.agent.protocol.answer import (
    Encoded,
    encode_error,
    encode_response,
    mark_replayed,
)
from edgeinfer.agent.protocol.inputs import check_inputs, check_outputs
from edgeinfer.agent.protocol.request import (
    HEADER_LENGTH_PROPERTY,
    REQUEST_PROPERTIES,
    JobMeta,
    RawRequest,
    RequestedOutput,
    RequestTensor,
    decode_request,
    meta_of,
    peek_id,
    peek_meta,
)
from edgeinfer.contract.queries import MODEL_NAME_PROPERTY, MODEL_VERSION_PROPERTY

__all__ = [
    "HEADER_LENGTH_PROPERTY", "MODEL_NAME_PROPERTY", "MODEL_VERSION_PROPERTY",
    "REQUEST_PROPERTIES", "Encoded", "JobMeta", "RawRequest", "RequestTensor",
    "RequestedOutput", "check_inputs", "check_outputs", "decode_request", "encode_error",
    "encode_response", "mark_replayed", "meta_of", "peek_id", "peek_meta",
]
