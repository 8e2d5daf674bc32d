"""The manifest's `instances`: how many jobs of a model run at once, and the runtime threads
each gets (so that together they do not oversubscribe the cores)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bench.models import build_heavy, build_mlp
from edgeinfer.fleet.client import InferenceClient
from edgeinfer.runtimes.base import LoadOptions, threads_per_instance, usable_cores
from edgeinfer.runtimes.onnxruntime_cpu import BACKEND as ORT_CPU
from edgeinfer.runtimes.openvino_backend import BACKEND as OPENVINO
from tests.broker import Broker
from tests.helpers import deploy, running_agent

DEVICE = "gw-instances"


def test_threads_are_the_cores_shared_between_instances() -> None:
    cores = usable_cores()
    assert threads_per_instance(LoadOptions()) == cores
    assert threads_per_instance(LoadOptions(instances=2)) == max(1, cores // 2)
    assert threads_per_instance(LoadOptions(instances=4 * cores)) == 1
    assert threads_per_instance(LoadOptions(threads=3, instances=2)) == 3  # configured wins


def test_runtimes_are_loaded_for_their_instances(tmp_path: Path) -> None:
    mlp = build_mlp(tmp_path)
    ort_one = ORT_CPU.load(mlp, "CPU", LoadOptions())
    ort_two = ORT_CPU.load(mlp, "CPU", LoadOptions(instances=2))
    got = [s._session.get_session_options().intra_op_num_threads  # type: ignore[union-attr]
           for s in (ort_one, ort_two)]
    assert got == [usable_cores(), max(1, usable_cores() // 2)]
    ov_one = OPENVINO.load(mlp, "CPU", LoadOptions())
    ov_two = OPENVINO.load(mlp, "CPU", LoadOptions(instances=2))
    streams = [int(s._pool._compiled.get_property("NUM_STREAMS"))  # type: ignore[union-attr]
               for s in (ov_one, ov_two)]
    assert streams == [1, 2]
    x = np.ones((3, 64), np.float32)
    for session in (ort_two, ov_two):  # and they still answer the same
        np.testing.assert_allclose(session.infer({"x": x})["y"], ort_one.infer({"x": x})["y"],
                                   rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    root = tmp_path_factory.mktemp("instances")
    with running_agent(root, DEVICE, jobs={"workers": 2}, log={"level": "INFO"}) as (broker, _):
        heavy = build_heavy(root / "models", width=1024, layers=16)
        for name, instances in (("one", "1"), ("two", "2")):
            assert deploy(broker.url, root, "--model", name, "--version", "1", "--file",
                          str(heavy), "--prefer", "onnxruntime", "--instances", instances,
                          "--wait", "60", device=DEVICE) == 0
        yield broker


def _two_at_once(broker: Broker, model: str) -> list[dict[str, float]]:
    x = np.random.default_rng(0).random((256, 64), dtype=np.float32)  # ~0.1-0.5 s of work
    with InferenceClient(broker.url) as client:
        client.infer(model, {"x": x[:1]}, device=DEVICE, binary=True, timeout=60)  # warm
        futures = [client.submit(model, {"x": x}, device=DEVICE, binary=True, timeout=120)
                   for _ in range(2)]
        return [{k: float(f.result(120).parameters[k]) for k in ("queue_ms", "infer_ms")}
                for f in futures]


def test_one_instance_runs_jobs_one_after_the_other(stack: Broker) -> None:
    first, second = sorted(_two_at_once(stack, "one"), key=lambda p: p["queue_ms"])
    # Both workers took a job at once; the second waited for the first run to end.
    assert second["queue_ms"] >= first["queue_ms"] + 0.8 * first["infer_ms"], (first, second)


def test_two_instances_run_jobs_side_by_side(stack: Broker) -> None:
    first, second = sorted(_two_at_once(stack, "two"), key=lambda p: p["queue_ms"])
    # Neither waited for the other's run (each waits at most for the broker and a worker).
    assert second["queue_ms"] < first["queue_ms"] + 0.5 * first["infer_ms"], (first, second)
