"""The demo: a broker, an agent, a trained model deployed through edge-fleet, jobs, results.

Run it with `scripts/demo.sh` (which installs what it needs first). It starts mosquitto on
a free loopback port unless a broker is configured (`--broker URL` or $EDGE_FLEET_BROKER),
starts an agent, trains scikit-learn's digits classifier and converts it to ONNX, deploys
it with `edge-fleet deploy`, sends the held-out digits as jobs and prints accuracy,
latency and the runtime chosen. It stops everything it started.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

from bench.models import build_digits
from bench.tinylm import build_tiny_lm
from edgeinfer.fleet.client import InferenceClient
from edgeinfer.fleet.localbroker import Broker
from edgeinfer.fleet.mqtt import read_retained

DEVICE = "demo-gw"
PREFIX = "edge/v1"
IN_FLIGHT = 64


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def wait_online(url: str, timeout: float = 60.0) -> dict[str, object]:
    topic = f"{PREFIX}/dev/{DEVICE}/state"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = read_retained(url, [topic], quiet_s=0.1, timeout_s=1)
        if topic in got:
            state = json.loads(got[topic])
            if state.get("state") == "online":
                return dict(state)
        time.sleep(0.2)
    raise SystemExit(f"[demo] the agent did not come online within {timeout:.0f}s")


def fleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeinfer.fleet.cli", *args], capture_output=True, text=True, check=False
    )


def demo_text_generation(url: str, work: Path) -> str | None:
    """Train the repo's tiny decoder-only LM (bench/tinylm.py: numpy, its own tokenizer),
    deploy it as a text-generation model with its tokenizer.json, and stream an answer.
    Returns the text, or None when the deploy failed."""
    t0 = time.monotonic()
    lm = build_tiny_lm(work / "lm")
    say(f"trained the tiny LM (bench/tinylm.py) on its text in {time.monotonic() - t0:.1f}s: "
        f"{lm.path.name}, {lm.path.stat().st_size} bytes, final loss {lm.final_loss:.3f}")
    say("edge-fleet deploy --device demo-gw --model tiny-lm --version 1 --file model.onnx "
        "--task text-generation --with tokenizer.json=... --with config.json=... --wait 120")
    res = fleet("deploy", "--broker", url, "--device", DEVICE, "--model", "tiny-lm",
                "--version", "1", "--file", str(lm.path), "--task", "text-generation",
                "--with", f"tokenizer.json={lm.model_dir / 'tokenizer.json'}",
                "--with", f"config.json={lm.model_dir / 'config.json'}",
                "--artifact-dir", str(work / "artifacts"), "--wait", "120")
    print(res.stdout, end="")
    if res.returncode != 0:
        print(res.stderr, end="", file=sys.stderr)
        return None
    prompt = "Four score and"
    inputs = {"text_input": np.array([prompt.encode()], dtype=object),
              "max_tokens": np.array([40], dtype=np.int32)}
    say(f"streaming a greedy answer to {prompt!r} (parameters.stream, one message per chunk):")
    chunks: list[str] = []
    with InferenceClient(url) as client:
        for part in client.stream("tiny-lm", inputs, device=DEVICE, binary=True,
                                  parameters={"stream": True}, timeout=60):
            chunk = bytes(part.outputs["text_output"][0]).decode()
            chunks.append(chunk)
            print(chunk, end="", flush=True)
    print()
    text = "".join(chunks)
    say(f"{len(chunks)} chunks, {len(text)} characters: {prompt}{text}")
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", default=os.environ.get("EDGE_FLEET_BROKER"),
                        help="use this broker instead of starting one")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edgeinfer-demo-"))
    broker: Broker | None = None
    agent: subprocess.Popen[bytes] | None = None
    try:
        if args.broker:
            url = args.broker
            say(f"using the configured broker {url}")
        else:
            broker = Broker(work / "broker")
            broker.start()
            url = broker.url
            say(f"started mosquitto on {url} (config {broker.conf})")

        t0 = time.monotonic()
        digits = build_digits(work / "models")
        sk_acc = float((digits.sklearn_pred == digits.y_test).mean())
        say(f"trained scikit-learn MLPClassifier on the digits set and converted it to ONNX "
            f"in {time.monotonic() - t0:.1f}s: {digits.path.name}, "
            f"{digits.path.stat().st_size} bytes; scikit-learn's own accuracy on the "
            f"{len(digits.y_test)} held-out digits: {sk_acc:.4f}")

        config = work / "agent.yaml"
        config.write_text(yaml.safe_dump({
            "device_id": DEVICE,
            "state_dir": str(work / "state"),
            "broker": {"url": url},
            "telemetry": {"interval_s": 5},
        }))
        log = (work / "agent.log").open("wb")
        t0 = time.monotonic()
        agent = subprocess.Popen(
            [sys.executable, "-m", "edgeinfer.agent.cli", "run", "--config", str(config)],
            stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            state = wait_online(url)
        except SystemExit:
            log.flush()
            print((work / "agent.log").read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        say(f"edge-agent {state['agent_version']} online as {DEVICE} after "
            f"{time.monotonic() - t0:.1f}s (log: {work / 'agent.log'})")

        say("edge-fleet deploy --device demo-gw --model digits --version 1 "
            f"--file {digits.path.name} --wait 60")
        res = fleet("deploy", "--broker", url, "--device", DEVICE, "--model", "digits",
                    "--version", "1", "--file", str(digits.path),
                    "--artifact-dir", str(work / "artifacts"), "--wait", "60")
        print(res.stdout, end="")
        if res.returncode != 0:
            print(res.stderr, end="", file=sys.stderr)
            return 1

        reported = json.loads(read_retained(url, [f"{PREFIX}/dev/{DEVICE}/reported"])[
            f"{PREFIX}/dev/{DEVICE}/reported"])
        model = next(m for m in reported["models"] if m["name"] == "digits")
        say(f"runtime chosen: {model['runtime']} on {model['device']}")
        for attempt in model["attempts"]:
            if not attempt["ok"]:
                say(f"  passed over {attempt['runtime']}"
                    f"{'/' + attempt['device'] if attempt['device'] else ''}: {attempt['reason']}")

        with InferenceClient(url) as client:
            # Throughput: every held-out digit as its own job, 64 in flight at a time (the
            # agent's queue holds 256; beyond that it answers RESOURCE_EXHAUSTED).
            t0 = time.monotonic()
            window = threading.BoundedSemaphore(IN_FLIGHT)
            futures = []
            for i in range(len(digits.x_test)):
                window.acquire()
                future = client.submit("digits", {"x": digits.x_test[i : i + 1]},
                                       device=DEVICE, timeout=60)
                future.add_done_callback(lambda _: window.release())
                futures.append(future)
            results = [f.result(120) for f in futures]
            elapsed = time.monotonic() - t0
            labels = np.array([int(r.outputs["label"][0]) for r in results])
            # Latency: one job at a time, closed loop.
            rtt = []
            for i in range(200):
                t1 = time.perf_counter()
                client.infer("digits", {"x": digits.x_test[i % len(digits.x_test)][None]},
                             device=DEVICE, timeout=10)
                rtt.append((time.perf_counter() - t1) * 1000)
        accuracy = float((labels == digits.y_test).mean())
        agree = float((labels == digits.sklearn_pred).mean())
        infer_ms = np.median([r.parameters["infer_ms"] for r in results])
        p50, p95, p99 = np.percentile(rtt, [50, 95, 99])
        say(f"sent {len(results)} held-out digits as jobs: accuracy {accuracy:.4f} "
            f"(scikit-learn {sk_acc:.4f}); agreement with scikit-learn's predict: {agree:.2%}")
        say(f"throughput {len(results) / elapsed:.0f} jobs/s with {IN_FLIGHT} in flight; "
            f"round trip one at a time: p50 {p50:.2f} ms, p95 {p95:.2f} ms, p99 {p99:.2f} ms; "
            f"median time in the runtime {infer_ms:.3f} ms "
            f"({results[0].parameters['runtime']}/{results[0].parameters['device']})")

        text = demo_text_generation(url, work)

        res = fleet("devices", "--broker", url)
        print(res.stdout, end="")
        ok = agree == 1.0 and text is not None
        say("OK: the agent's answers equal scikit-learn's" if ok
            else "MISMATCH: the agent's answers differ from scikit-learn's")
        return 0 if ok else 1
    finally:
        if agent is not None:
            agent.terminate()
            try:
                agent.wait(15)
            except subprocess.TimeoutExpired:
                agent.kill()
            say(f"agent stopped (exit {agent.returncode})")
        if broker is not None:
            broker.stop()
            say("broker stopped")
        if args.keep:
            say(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
