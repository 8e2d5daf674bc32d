"""Voice activity through a real agent: a WAV file in over MQTT (binary BYTES), speech
segments out; deployed without health inputs (the agent warms silero up on a window of its
own: the synthetic [1, 1] input is too short for the model)."""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Iterator

import numpy as np
import pytest
import soundfile as sf

from bench.models import silero_vad_path
from edgeinfer.fleet.client import InferenceClient
from edgeinfer.fleet.errors import InvalidArgument
from edgeinfer.runtimes.base import LoadOptions
from edgeinfer.runtimes.onnxruntime_cpu import BACKEND as ORT_CPU
from edgeinfer.runtimes.pipelines import build_pipeline
from tests.broker import Broker
from tests.helpers import deploy, reported, running_agent

DEVICE = "gw-vad"


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A 22.05 kHz WAV: a second of silence, an espeak-ng sentence, a second of silence."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng): no speech to test on")
    d = tmp_path_factory.mktemp("speech")
    subprocess.run(["espeak-ng", "-w", str(d / "s.wav"), "Gateways answer jobs close to the sensors."],
                   check=True)
    x, rate = sf.read(d / "s.wav", dtype="float32")
    pad = np.zeros(rate, np.float32)
    buf = io.BytesIO()
    sf.write(buf, np.concatenate([pad, x, pad]), rate, format="WAV")
    return buf.getvalue()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    root = tmp_path_factory.mktemp("vad")
    with running_agent(root, DEVICE, log={"level": "INFO"}) as (broker, _):
        assert deploy(broker.url, root, "--model", "vad", "--version", "1", "--file",
                      str(silero_vad_path()), "--task", "voice-activity-detection",
                      "--wait", "90", device=DEVICE) == 0
        yield broker


def test_segments_through_the_agent_equal_the_pipeline_run_directly(stack: Broker,
                                                                    speech: bytes) -> None:
    session = ORT_CPU.load(silero_vad_path(), "CPU", LoadOptions())
    pipe = build_pipeline("voice-activity-detection", {}, None, session)
    want = pipe.run(session, {"audio": np.array([speech], dtype=object)})["segments"]
    with InferenceClient(stack.url) as client:
        got = client.infer("vad", {"audio": np.array([speech], dtype=object)}, device=DEVICE,
                           binary=True, timeout=60)
    assert got.parameters["runtime"] == "onnxruntime"  # OpenVINO cannot convert its If node
    assert want.shape[0] >= 1
    np.testing.assert_allclose(got.outputs["segments"], want, atol=1e-6)
    # The sentence starts after the leading second of silence and ends before the trailing one.
    assert 0.8 < float(want[0, 0]) < 1.3


def test_silero_is_served_without_health_inputs(stack: Broker) -> None:
    entry = next(m for m in reported(stack.url, DEVICE)["models"] if m["name"] == "vad")
    assert entry["state"] == "serving", entry
    assert entry["runtime"] == "onnxruntime", entry


def test_not_audio_is_invalid_argument_and_the_next_job_works(stack: Broker, speech: bytes) -> None:
    with InferenceClient(stack.url) as client:
        with pytest.raises(InvalidArgument, match="audio"):
            client.infer("vad", {"audio": np.array([b"this is not a wav file"], dtype=object)},
                         device=DEVICE, binary=True, timeout=60)
        ok = client.infer("vad", {"audio": np.array([speech], dtype=object)}, device=DEVICE,
                          binary=True, timeout=60)
    assert ok.outputs["segments"].shape[1] == 2
