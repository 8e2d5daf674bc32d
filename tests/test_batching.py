"""Dynamic batching and priorities against a real agent: same answers, fewer runs."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from bench.models import build_mlp
from edgeinfer.fleet.client import InferenceClient
from edgeinfer.fleet.oip import InferResult
from tests.agentproc import AgentProcess
from tests.broker import Broker
from tests.helpers import deploy, running_agent, wait_state

DEVICE = "gw-batch"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Broker, Path]]:
    root = tmp_path_factory.mktemp("batch")
    with running_agent(root, DEVICE, log={"level": "INFO"}) as (broker, _):
        mlp = build_mlp(root / "models")
        assert deploy(broker.url, root, "--model", "mlp", "--version", "1", "--file", str(mlp),
                      "--prefer", "onnxruntime", "--max-batch", "16", "--max-delay-ms", "20",
                      "--wait", "60", device=DEVICE) == 0
        assert deploy(broker.url, root, "--model", "mlp1", "--version", "1", "--file", str(mlp),
                      "--prefer", "onnxruntime", "--wait", "60", device=DEVICE) == 0
        yield broker, mlp


def test_batched_answers_equal_single_runs(stack: tuple[Broker, Path]) -> None:
    broker, mlp = stack
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((int(rng.integers(1, 4)), 64)).astype(np.float32)
          for _ in range(96)]
    reference = ort.InferenceSession(str(mlp), providers=["CPUExecutionProvider"])
    with InferenceClient(broker.url) as client:
        futures = [client.submit("mlp", {"x": x}, device=DEVICE, binary=True, timeout=30)
                   for x in xs]
        results = [f.result(60) for f in futures]
    batch_sizes = [r.parameters.get("batch_size", 1) for r in results]
    assert max(batch_sizes) > 1, "no batch was formed with 96 jobs in flight"
    assert max(batch_sizes) <= 16
    for x, r in zip(xs, results, strict=True):
        want = reference.run(None, {"x": x})[0]
        assert r.outputs["y"].shape == want.shape
        np.testing.assert_allclose(r.outputs["y"], want, rtol=1e-5, atol=1e-6)


def test_unbatched_model_runs_jobs_one_by_one(stack: tuple[Broker, Path]) -> None:
    broker, _ = stack
    x = np.ones((2, 64), np.float32)
    with InferenceClient(broker.url) as client:
        futures = [client.submit("mlp1", {"x": x}, device=DEVICE, timeout=30) for _ in range(32)]
        results = [f.result(60) for f in futures]
    assert all("batch_size" not in r.parameters for r in results)


def test_lone_job_waits_at_most_the_delay(stack: tuple[Broker, Path]) -> None:
    broker, _ = stack
    with InferenceClient(broker.url) as client:
        result = client.infer("mlp", {"x": np.ones((1, 64), np.float32)}, device=DEVICE,
                              timeout=10)
    # Alone, it waits for company no longer than max_delay_ms (20 ms), plus scheduling.
    assert result.parameters["queue_ms"] < 20 + 200


def test_higher_priority_jobs_run_first(tmp_path: Path) -> None:
    from bench.models import build_heavy

    broker = Broker(tmp_path / "broker")
    broker.start()
    agent = AgentProcess(tmp_path / "agent", broker.url, "gw-prio", jobs={"workers": 1},
                         log={"level": "INFO"})
    agent.start()
    try:
        wait_state(broker.url, "online", "gw-prio")
        heavy = build_heavy(tmp_path / "m", width=1024, layers=8)
        assert deploy(broker.url, tmp_path, "--model", "heavy", "--version", "1", "--file",
                      str(heavy), "--prefer", "onnxruntime", "--wait", "60",
                      device="gw-prio") == 0
        x = np.random.default_rng(0).random((512, 64), dtype=np.float32)
        done: list[str] = []
        lock = threading.Lock()

        def record(fut: Future[InferResult]) -> None:
            with lock:
                done.append(str(fut.result().id))

        with InferenceClient(broker.url) as client:
            # The most urgent of all, so it runs first even if it shares an intake batch
            # with the others; they queue behind it while it keeps the one worker busy.
            blocker = client.submit("heavy", {"x": np.tile(x, (8, 1))}, device="gw-prio",
                                    binary=True, priority=1, timeout=60)
            time.sleep(0.1)
            futures = []
            for i in range(6):
                prio = 1 if i % 2 else 9
                f = client.submit("heavy", {"x": x}, device="gw-prio", binary=True,
                                  priority=prio, timeout=60, job_id=f"p{prio}-{i}")
                f.add_done_callback(record)
                futures.append(f)
            blocker.result(60)
            for f in futures:
                f.result(60)
        # With one worker busy on the blocker, the queued jobs run by priority: 1 before 9.
        assert [d.split("-")[0] for d in done] == ["p1"] * 3 + ["p9"] * 3, done
    finally:
        agent.stop()
        broker.stop()
