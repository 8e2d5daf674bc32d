"""The MQTT transport alone: a responder that answers every job with a canned response.

A plain paho client (MQTT v5, TCP_NODELAY on its socket) subscribes to
`{prefix}/dev/<device>/jobs` for each canned device at QoS 1 and answers each request on
its Response Topic with its Correlation Data, at QoS 1, without decoding it: no
inference, no journal. The answer is the file `<dir>/<device>.body`, with the user
property `Inference-Header-Content-Length` when `<dir>/<device>.hlen` holds a header
length: the bytes the agent answered the same request with. The job client and the
concurrency are the agent's: this is the ceiling the agent is compared against.

    python -m bench.echo mqtt://127.0.0.1:1883 /tmp/canned
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from bench.responder import serve
from edgeinfer.contract.properties import PackedPublishProperties
from edgeinfer.fleet.oip import HEADER_LENGTH_PROPERTY

READY = "echo ready"


def load_canned(folder: Path) -> dict[str, tuple[bytes, list[tuple[str, str]]]]:
    canned: dict[str, tuple[bytes, list[tuple[str, str]]]] = {}
    for body in folder.glob("*.body"):
        hlen = body.with_suffix(".hlen")
        props = [(HEADER_LENGTH_PROPERTY, hlen.read_text().strip())] if hlen.exists() else []
        canned[body.stem] = (body.read_bytes(), props)
    return canned


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="answer MQTT jobs with canned responses")
    parser.add_argument("broker")
    parser.add_argument("canned", type=Path, help="folder of <device>.body files")
    parser.add_argument("--prefix", default="edge/v1")
    args = parser.parse_args(argv)
    canned = load_canned(args.canned)

    def on_message(c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        device = msg.topic.split("/")[-2]
        body, user_props = canned[device]
        req = msg.properties
        # The agent's own encoder of PUBLISH properties: the ceiling pays what the agent pays.
        props = PackedPublishProperties(getattr(req, "CorrelationData", None), user_props or ())
        reply = getattr(req, "ResponseTopic", None) or f"{args.prefix}/dev/{device}/results"
        c.publish(reply, body, qos=1, properties=props)

    topics = [f"{args.prefix}/dev/{device}/jobs" for device in canned]
    return serve(args.broker, f"bench-echo-{id(canned):x}", topics, on_message, ready=READY,
                 max_inflight=64)  # as the agent's session has it


if __name__ == "__main__":
    sys.exit(main())
