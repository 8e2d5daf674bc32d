"""bench/codec_echo.py, the echo on the `mqtt5` codec: through a real mosquitto it answers
each job as the paho echo does (the canned body and header length, the job's Correlation
Data, on its Response Topic or else the device's results topic). Behaviour, not timing."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.codec_echo import READY
from edgeinfer.agent.mqtt_wire import frame_length
from edgeinfer.fleet.mqtt import connect
from edgeinfer.fleet.oip import HEADER_LENGTH_PROPERTY
from tests.broker import Broker

pytest.importorskip("mqtt5", reason="pip install 'edgeinfer[agent]'")


def test_frame_length_reads_the_remaining_length() -> None:
    # The codec echo frames its reads with the agent's own frame_length.
    assert frame_length(b"\x40\x02\x00\x05", 0) == 4
    assert frame_length(b"\x30\x80\x01", 0) == 3 + 128
    assert frame_length(b"\x30", 0) is None
    assert frame_length(b"\x30\x80", 0) is None
    with pytest.raises(ValueError):
        frame_length(b"\x30\xff\xff\xff\xff", 0)


def test_codec_echo_answers_jobs_with_their_correlation_data(broker: Broker,
                                                             tmp_path: Path) -> None:
    canned = tmp_path / "canned"
    canned.mkdir()
    big = bytes(range(256)) * 2400  # ~600 KB: an answer that takes many reads to arrive
    (canned / "gw-a.body").write_bytes(b'{"model_name":"m"}' + b"\x00\x00\x80\x3f")
    (canned / "gw-a.hlen").write_text("18")
    (canned / "gw-b.body").write_bytes(b'{"outputs":[]}')
    proc = subprocess.Popen([sys.executable, "-m", "bench.codec_echo", broker.url, str(canned)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    got: list[tuple[str, bytes, bytes | None, list[tuple[str, str]]]] = []
    lock = threading.Lock()
    all_in = threading.Event()
    jobs = 6

    def on_answer(msg: Any) -> None:
        with lock:
            got.append((msg.topic, bytes(msg.payload),
                        getattr(msg.properties, "CorrelationData", None),
                        list(getattr(msg.properties, "UserProperty", None) or [])))
            if len(got) == jobs + 1:
                all_in.set()

    try:
        assert proc.stdout is not None
        assert READY in proc.stdout.readline()
        with connect(broker.url) as conn:
            conn.subscribe("edge/v1/reply/t/#", on_answer)
            conn.subscribe("edge/v1/dev/gw-b/results", on_answer)
            for i in range(jobs):
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.ResponseTopic = f"edge/v1/reply/t/{i % 2}"
                props.CorrelationData = f"job-{i}".encode()
                # A large job: the echo must gather it over many reads before answering.
                body = big if i == 3 else b"job"
                conn.publish("edge/v1/dev/gw-a/jobs", body, qos=1, properties=props).result(10)
            # No Response Topic: the answer goes to the device's results topic.
            plain = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            plain.CorrelationData = b"no-reply-topic"
            conn.publish("edge/v1/dev/gw-b/jobs", b"job", qos=1, properties=plain).result(10)
            assert all_in.wait(10), got
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    by_corr = {corr: (topic, body, props) for topic, body, corr, props in got}
    assert len(got) == jobs + 1 and len(by_corr) == jobs + 1
    for i in range(jobs):
        assert by_corr[f"job-{i}".encode()] == (
            f"edge/v1/reply/t/{i % 2}", (canned / "gw-a.body").read_bytes(),
            [(HEADER_LENGTH_PROPERTY, "18")])
    assert by_corr[b"no-reply-topic"] == ("edge/v1/dev/gw-b/results", b'{"outputs":[]}', [])
