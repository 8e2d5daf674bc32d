"""Streamed answers: `InferenceClient.stream` and `async for` on `AsyncInferenceClient`.

The agent does not stream yet, so a small protocol peer written here answers jobs as a
streaming agent would: several responses per job to its Response Topic, each with the
job's Correlation Data, `"sequence_end": false` until the last one says `true`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeinfer.contract.topics import DEFAULT_PREFIX
from edgeinfer.fleet.client import AsyncInferenceClient, InferenceClient, NotFound, ResponseStream
from edgeinfer.fleet.oip import HEADER_LENGTH_PROPERTY, split_response
from tests.broker import Broker

DEVICE = "gw-stream"
PARTS = 3  # partial responses before the final one


class Streamer:
    """Answers each job with PARTS partial responses and a final one.

    Model `gen`: parts carry output `tok` INT32 [1] = 0, 1, 2 and the final one 3 (binary
    when the job asks for binary outputs). `plain`: one response without sequence_end.
    `fail`: one part, then a NOT_FOUND error. `stall`: one part, then nothing.
    """

    def __init__(self, url: str) -> None:
        port = int(url.rsplit(":", 1)[1])
        self.lock = threading.Lock()
        self.jobs: list[tuple[str, bytes]] = []  # (job id, correlation data)
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id="streamer", protocol=paho.MQTTv5)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(f"{DEFAULT_PREFIX}/dev/+/jobs", 1)
        assert subscribed.wait(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        try:
            self._answer(msg)
        except Exception as exc:  # pragma: no cover - shows up as a client timeout
            print("streamer failed:", repr(exc))

    def _answer(self, msg: paho.MQTTMessage) -> None:
        props: Any = msg.properties
        header_length = None
        for key, value in getattr(props, "UserProperty", None) or []:
            if key == HEADER_LENGTH_PROPERTY:
                header_length = int(value)
        req, _ = split_response(bytes(msg.payload), header_length)
        correlation = bytes(props.CorrelationData)
        with self.lock:
            self.jobs.append((req["id"], correlation))
        binary = bool((req.get("parameters") or {}).get("binary_data_output"))
        model = req["model_name"]

        def send(doc: dict[str, Any], blob: bytes = b"") -> None:
            out = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            out.CorrelationData = correlation  # every part echoes the job's correlation
            header = msgspec.json.encode(doc)
            if blob:
                out.UserProperty = [(HEADER_LENGTH_PROPERTY, str(len(header)))]
            self.client.publish(props.ResponseTopic, header + blob, qos=1, properties=out)

        def part(i: int, end: bool | None) -> None:
            tensor: dict[str, Any] = {"name": "tok", "datatype": "INT32", "shape": [1]}
            blob = b""
            if binary:
                blob = np.array([i], "<i4").tobytes()
                tensor["parameters"] = {"binary_data_size": len(blob)}
            else:
                tensor["data"] = [i]
            params: dict[str, Any] = {"device": DEVICE}
            if end is not None:
                params["sequence_end"] = end
            send({"id": req["id"], "model_name": model, "model_version": "1",
                  "outputs": [tensor], "parameters": params}, blob)

        if model == "gen":
            for i in range(PARTS):
                part(i, False)
            part(PARTS, True)
        elif model == "plain":
            part(7, None)
        elif model == "fail":
            part(0, False)
            send({"id": req["id"], "error": "model fail went away",
                  "parameters": {"code": "NOT_FOUND"}})
        elif model == "stall":
            part(0, False)


@pytest.fixture
def streamer(broker: Broker) -> Iterator[Streamer]:
    s = Streamer(broker.url)
    try:
        yield s
    finally:
        s.close()


def _toks(results: list[Any]) -> list[int]:
    return [int(r.outputs["tok"][0]) for r in results]


X = {"x": np.zeros((1, 4), np.float32)}


def test_sync_stream_yields_every_part_then_the_final_response(
    broker: Broker, streamer: Streamer
) -> None:
    with InferenceClient(broker.url) as client:
        stream = client.stream("gen", X, device=DEVICE, job_id="g-1")
        assert isinstance(stream, ResponseStream)
        results = list(stream)
        assert _toks(results) == [0, 1, 2, 3]
        assert [r.parameters["sequence_end"] for r in results] == [False, False, False, True]
        assert {r.id for r in results} == {"g-1"}
        # The job went out with the stream's correlation data, and the stream took every
        # response that echoed it.
        assert streamer.jobs == [("g-1", stream.correlation)]
        assert stream.responses == 4
        assert client.in_flight == 0
        assert list(stream) == []  # exhausted

        # Binary outputs on every part; a response without sequence_end ends a stream.
        assert _toks(list(client.stream("gen", X, device=DEVICE, binary=True))) == [0, 1, 2, 3]
        assert _toks(list(client.stream("plain", X, device=DEVICE))) == [7]


def test_sync_stream_errors_timeouts_and_early_close(broker: Broker, streamer: Streamer) -> None:
    with InferenceClient(broker.url) as client:
        stream = client.stream("fail", X, device=DEVICE)
        assert _toks([next(stream)]) == [0]
        with pytest.raises(NotFound, match="went away"):
            next(stream)
        assert list(stream) == []

        # `timeout` bounds the wait for each next response, not the whole stream.
        stream = client.stream("stall", X, device=DEVICE, timeout=0.5)
        assert _toks([next(stream)]) == [0]
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=r"no response within 0\.5s"):
            next(stream)
        assert 0.3 < time.monotonic() - t0 < 3.0
        assert client.in_flight == 0

        # Leaving early: the rest of the job's responses are dropped, nothing leaks.
        with client.stream("gen", X, device=DEVICE) as stream:
            first = next(stream)
        assert int(first.outputs["tok"][0]) == 0
        time.sleep(0.3)
        assert client.in_flight == 0
        assert client.infer("plain", X, device=DEVICE).outputs["tok"].tolist() == [7]


def test_async_streams_in_parallel_keep_their_own_responses(
    broker: Broker, streamer: Streamer
) -> None:
    async def main() -> None:
        async with AsyncInferenceClient(broker.url) as client:
            async def one(i: int) -> list[Any]:
                return [r async for r in client.stream("gen", X, device=DEVICE, job_id=f"a-{i}")]

            runs = await asyncio.gather(*(one(i) for i in range(20)))
            for i, results in enumerate(runs):
                assert _toks(results) == [0, 1, 2, 3]
                assert {r.id for r in results} == {f"a-{i}"}
                # The async client asks for binary outputs by default.
                assert all("binary_data_size" in r.raw["outputs"][0]["parameters"]
                           for r in results)

            stream = client.stream("fail", X, device=DEVICE)
            got = []
            with pytest.raises(NotFound):
                async for r in stream:
                    got.append(r)
            assert _toks(got) == [0]

            async with client.stream("gen", X, device=DEVICE) as s:
                async for r in s:
                    assert int(r.outputs["tok"][0]) == 0
                    break
            await asyncio.sleep(0.3)
            assert client.in_flight == 0

    asyncio.run(main())
    assert len(streamer.jobs) == 22
    assert len({c for _, c in streamer.jobs}) == 22  # one correlation per job
