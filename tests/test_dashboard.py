"""The controller's web page: served with a strict CSP, fed by /api/..., and shown in a real
headless Chromium (Debian's, driven by Selenium through /usr/bin/chromedriver) over a fleet
published to a real mosquitto: devices, health, rollout waves, events, live updates, and
device-supplied text that must stay text."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeinfer.fleet.artifacts import ArtifactStore
from edgeinfer.fleet.controller import Controller
from edgeinfer.fleet.dashboard import health_summary, page
from edgeinfer.fleet.http_api import Api, ControllerServer
from edgeinfer.fleet.mqtt import connect
from edgeinfer.fleet.registry import SqlRegistry, open_registry
from edgeinfer.fleet.rollout import BAKING, PENDING, RUNNING, SERVING, Rollout, RolloutDevice, RolloutStore
from tests.broker import Broker
from tests.helpers import http_request

P = "edge/v1"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ROOT = Path(__file__).resolve().parent.parent
# Device-supplied strings that would run script or add elements if parsed as HTML.
EVIL_ERROR = '<img src=x onerror="window.__pwned=1"><b id="injected">bold</b>'
EVIL_CPU = "<script>window.__pwned=2</script>Xeon"
EVIL_EVENT = '<i id="injected-event">evil</i>'


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[SqlRegistry]:
    reg = open_registry(tmp_path / "registry.sqlite3")
    yield reg
    reg.close()


def _server(tmp_path: Path, registry: SqlRegistry,
            status: Callable[[], dict[str, Any]]) -> ControllerServer:
    s = ControllerServer(ArtifactStore(tmp_path / "artifacts"), Api(registry, status),
                         "127.0.0.1", 0)
    s.start()
    return s


def _rollout(registry: SqlRegistry) -> Rollout:
    """Rollout digits:4 in its second wave (baking), gw-1 serving from wave 1, gw-2 pending."""
    store = RolloutStore(registry)
    r = store.create(Rollout(
        id=0, model="digits", version="4", sha256="b" * 64, spec={"name": "digits"},
        selector="site=berlin", waves=["1", "50%", "100%"], max_failures="0",
        health="error_rate<1%,p95_ms<50", bake_s=60.0, install_timeout_s=300.0,
        status=RUNNING, wave=1, phase=BAKING, bake_until=time.time() + 600))
    store.put_device(RolloutDevice(r.id, "gw-1", 0, SERVING))
    store.put_device(RolloutDevice(r.id, "gw-2", 1, PENDING))
    return r


# -- without a browser ------------------------------------------------------------------------


def test_page_is_served_with_a_strict_csp(tmp_path: Path, registry: SqlRegistry) -> None:
    server = _server(tmp_path, registry, lambda: {"connected": True})
    try:
        status, headers, body = http_request(server, "/")
        assert status == 200
        assert headers["Content-Type"] == "text/html; charset=utf-8"
        assert b"<title>edgeinfer fleet</title>" in body
        csp = headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp
        assert "connect-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert "unsafe-eval" not in csp
        assert re.search(r"script-src 'sha256-[A-Za-z0-9+/=]{44}'", csp)
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert http_request(server, "/", {"If-None-Match": headers["ETag"]})[0] == 304
        status, headers, body = http_request(server, "/index.html", method="HEAD")
        assert (status, body) == (200, b"")
        assert int(headers["Content-Length"]) == len(page().body)
        assert http_request(server, "/nothing-here")[0] == 404  # the artifact handler's 404
    finally:
        server.shutdown()


def test_page_never_parses_data_as_html() -> None:
    """The page builds the DOM from text nodes only; nothing in it may turn text into markup."""
    text = page().body.decode()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function", "srcdoc", "http://", "https://"):
        assert sink not in text.split("<script>", 1)[1], sink
    assert "createTextNode" in text


def test_api_rollouts_and_health(tmp_path: Path, registry: SqlRegistry) -> None:
    registry.record_state("gw-1", state="online", agent_version="0.1.0", session_id="s",
                          started_at=None, seen_at=None)
    registry.record_state("gw-2", state="online", agent_version="0.1.0", session_id="s",
                          started_at=None, seen_at=None)
    registry.set_labels("gw-1", {"site": "berlin"})
    registry.set_labels("gw-2", {"site": "berlin"})
    registry.record_telemetry("gw-1", {"queue_depth": 2, "inference": {
        "jobs_ok": 90, "jobs_failed": 3, "errors_by_code": {"INTERNAL": 3},
        "models": {"digits:4": {"ok": 90, "errors": {"INTERNAL": 3},
                                "latency_ms": {"p50": 1.5, "p95": 7.25, "p99": 9}}}}},
        "2026-01-01T00:00:00.000Z")
    server = _server(tmp_path, registry, lambda: {"connected": True})
    try:
        status, _, body = http_request(server, "/api/rollouts")
        assert (status, json.loads(body)) == (200, {"rollouts": []})  # tables created lazily
        r = _rollout(registry)
        status, _, body = http_request(server, "/api/rollouts")
        assert status == 200
        (doc,) = json.loads(body)["rollouts"]
        assert (doc["id"], doc["target"], doc["status"], doc["phase"]) == (
            r.id, "digits:4", "running", "baking")
        assert doc["group_size"] == 2
        assert 500 < doc["bake_left_s"] <= 600
        assert "spec" not in doc
        assert [(w["amount"], w["target"], w["devices"], w["current"], w["done"])
                for w in doc["waves_detail"]] == [
            ("1", 1, ["gw-1"], False, True), ("50%", 1, ["gw-2"], True, False),
            ("100%", 2, [], False, False)]
        assert [(w["serving"], w["pending"]) for w in doc["waves_detail"]] == [
            (1, 0), (0, 1), (0, 0)]
        assert [d["device_id"] for d in doc["devices"]] == ["gw-1", "gw-2"]
        assert json.loads(http_request(server, "/api/rollouts?status=completed")[2]) == {"rollouts": []}

        devices = json.loads(http_request(server, "/api/devices")[2])["devices"]
        assert "health" not in devices[0]  # only when asked
        devices = json.loads(http_request(server, "/api/devices?health=1")[2])["devices"]
        assert devices[1]["health"] is None
        health = devices[0]["health"]
        assert health["queue_depth"] == 2
        assert (health["jobs_ok"], health["jobs_failed"]) == (90, 3)
        assert health["errors_by_code"] == {"INTERNAL": 3}
        assert health["models"]["digits:4"] == {"ok": 90, "errors": 3, "p50_ms": 1.5,
                                                "p95_ms": 7.25, "p99_ms": 9.0}
        assert health["received_at"] == "2026-01-01T00:00:00.000Z"
    finally:
        server.shutdown()


def test_health_summary_tolerates_any_shape() -> None:
    junks: list[Any] = [None, [], "x", {"inference": 5, "queue_depth": "deep", "health": []},
                        {"inference": {"models": {"m:1": 7, "m:2": {"latency_ms": "fast"}}}}]
    for junk in junks:
        got = health_summary(junk, None)
        assert got["queue_depth"] is None
        assert all(m["p95_ms"] is None for m in got["models"].values())
    assert health_summary({"queue_depth": True}, None)["queue_depth"] is None


# -- in a real browser ----------------------------------------------------------------------


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (/usr/bin/chromium, "
                    "/usr/bin/chromedriver): apt-get install -y chromium chromium-driver, "
                    "or scripts/bootstrap.sh")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the dev extra)")
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never download anything
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,900",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def _publish(broker: Broker, messages: dict[str, Any], *, retain: bool) -> None:
    with connect(broker.url) as conn:
        for topic, doc in messages.items():
            payload = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
            conn.publish(topic, payload, retain=retain).result(2)


def _until(check: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"not shown in time: {what}"
        time.sleep(0.1)


def _state(online: bool) -> dict[str, Any]:
    return {"state": "online" if online else "offline", "agent_version": "0.1.0",
            "session_id": "s1", "started_at": "2026-01-01T00:00:00Z"}


def _reported(device: str, models: list[dict[str, Any]], *, cpu: str = "Cortex-A76",
              gpus: list[str] | None = None, last_error: str | None = None) -> dict[str, Any]:
    return {
        "device_id": device, "agent_version": "0.1.0", "revision": 3, "models": models,
        "last_error": last_error,
        "hardware": {"cpu": {"model": cpu, "cores_logical": 4}, "memory_mb": 8192,
                     "nvidia_gpus": [{"index": i, "name": g} for i, g in enumerate(gpus or [])],
                     "onnxruntime": {"providers": ["CUDAExecutionProvider",
                                                   "CPUExecutionProvider"] if gpus
                                     else ["CPUExecutionProvider"]},
                     "openvino": {"devices": {"CPU": "x"}}},
        "updated_at": "2026-01-01T00:00:05Z",
    }


def _telemetry(models: dict[str, tuple[int, int, float]], queue: int) -> dict[str, Any]:
    return {"ts": "2026-01-01T00:00:06Z", "queue_depth": queue, "inference": {
        "jobs_ok": sum(m[0] for m in models.values()),
        "jobs_failed": sum(m[1] for m in models.values()),
        "errors_by_code": {"INTERNAL": sum(m[1] for m in models.values())},
        "models": {k: {"ok": ok, "errors": {"INTERNAL": err},
                       "latency_ms": {"p50": p95 / 2, "p95": p95, "p99": p95 * 1.2}}
                   for k, (ok, err, p95) in models.items()}}}


def _serving(name: str, version: str, runtime: str = "onnxruntime",
             device: str = "cpu") -> dict[str, Any]:
    return {"name": name, "version": version, "sha256": "a" * 64, "state": "serving",
            "runtime": runtime, "device": device}


def test_dashboard_in_chromium(broker: Broker, tmp_path: Path, registry: SqlRegistry,
                               browser: Any) -> None:
    driver = browser
    registry.set_labels("gw-1", {"site": "berlin", "tier": "canary"})
    registry.set_labels("gw-2", {"site": "berlin"})
    _rollout(registry)
    dev = f"{P}/dev"
    _publish(broker, {
        f"{dev}/gw-1/state": _state(True),
        f"{dev}/gw-1/reported": _reported("gw-1", [_serving("digits", "4", "tensorrt", "cuda:0"),
                                                   _serving("vad", "2")], gpus=["Orin"]),
        f"{dev}/gw-2/state": _state(True),
        f"{dev}/gw-2/reported": _reported(
            "gw-2", [_serving("digits", "3"),
                     {"name": "digits", "version": "4", "state": "loading"}],
            cpu=EVIL_CPU, last_error=EVIL_ERROR),
        f"{dev}/cam-3/state": _state(False),
        f"{dev}/cam-3/reported": _reported("cam-3", [_serving("yolo", "8", "openvino", "GPU")]),
    }, retain=True)
    controller = Controller(registry, broker.url, prefix=P, client_id="ctl-dashboard",
                            session_expiry_s=60).start()
    server = _server(tmp_path, registry, controller.status)
    try:
        assert controller.connected.wait(5)
        _publish(broker, {
            f"{dev}/gw-1/telemetry": _telemetry({"digits:4": (1200, 4, 7.5),
                                                 "vad:2": (300, 0, 2.0)}, queue=3),
            f"{dev}/gw-1/events": {"ts": "2026-01-01T00:01:00Z", "type": "model_serving",
                                   "device_id": "gw-1", "model": "digits:4"},
            f"{dev}/gw-2/events": {"ts": "2026-01-01T00:01:01Z", "type": "model_failed",
                                   "device_id": "gw-2", "message": EVIL_EVENT},
        }, retain=False)
        _until(lambda: len(registry.devices()) == 3 and registry.telemetry("gw-1")
               and len(registry.events()) == 2, "the fleet in the registry")

        t0 = time.monotonic()
        driver.get(server.url + "/")
        js = driver.execute_script

        def row(device: str) -> Any:
            return js("const r = document.querySelector(`tr[data-device-id='${arguments[0]}']`);"
                      "return r && {online: r.dataset.online, text: r.innerText};", device)

        _until(lambda: all(row(d) for d in ("gw-1", "gw-2", "cam-3"))
               and js("return document.querySelectorAll('.rollout').length") == 1,
               "devices and the rollout")
        first_render_s = time.monotonic() - t0
        assert js("return [...document.querySelectorAll('#devices tr')]"
                  ".map(r => r.dataset.deviceId)") == ["cam-3", "gw-1", "gw-2"]
        gw1, gw2, cam3 = row("gw-1"), row("gw-2"), row("cam-3")
        assert (gw1["online"], gw2["online"], cam3["online"]) == ("true", "true", "false")
        assert "online" in gw1["text"]
        assert "offline" in cam3["text"]
        # Models and versions with their state, runtimes, hardware, labels, health.
        assert "digits:4" in gw1["text"]
        assert "serving" in gw1["text"]
        assert "tensorrt/cuda:0" in gw1["text"]
        assert "vad:2" in gw1["text"]
        assert "digits:3" in gw2["text"]
        assert "loading" in gw2["text"]
        assert "yolo:8" in cam3["text"]
        assert "GPU Orin" in gw1["text"]
        assert "ORT: CUDA, CPU" in gw1["text"]
        assert "OpenVINO: CPU" in gw1["text"]
        assert "site=berlin" in gw1["text"]
        assert "tier=canary" in gw1["text"]
        assert "p95 7.5 ms, 4 err" in gw1["text"]  # per model
        assert "queue 3" in gw1["text"]
        assert "1500 ok" in gw1["text"]
        assert "4 failed" in gw1["text"]
        assert "no telemetry" in gw2["text"]
        # The rollout: waves, their devices, the gates.
        rollout = js("return document.querySelector('.rollout').innerText")
        for part in ("digits:4", "site=berlin", "running", "wave 2/3 baking",
                     "wave 1: 1", "wave 2: 50%", "wave 3: 100%", "(1 of 2)",
                     "health error_rate<1%,p95_ms<50", "max failures 0", "bake 60 s"):
            assert part in rollout, part
        waves = js("return [...document.querySelectorAll('.wave')].map(w => "
                   "[w.className, [...w.querySelectorAll('.chip')].map(c => c.innerText + ' ' "
                   "+ c.className)])")
        assert waves == [["wave done", ["gw-1 chip serving"]],
                         ["wave current", ["gw-2 chip pending"]], ["wave", []]]
        events = js("return document.getElementById('events').innerText")
        assert "model_serving" in events
        assert "model_failed" in events
        assert "broker connected" in js("return document.getElementById('broker').innerText")

        # Device-supplied markup is shown as text and never becomes elements or runs.
        assert js("return document.getElementById('injected')") is None
        assert js("return document.getElementById('injected-event')") is None
        assert js("return document.querySelectorAll('#devices img, #devices script, "
                  "#events i').length") == 0
        assert js("return window.__pwned") is None
        assert EVIL_ERROR in gw2["text"]
        assert EVIL_CPU in gw2["text"]
        assert EVIL_EVENT in events
        # The CSP admitted the page's own script (it rendered) and nothing was refused.
        csp_errors = [e for e in driver.get_log("browser") if "Content Security Policy" in
                      e.get("message", "")]
        assert csp_errors == []

        # Live: later messages appear without a reload.
        js("window.__sameDocument = 'yes'")
        t1 = time.monotonic()
        _publish(broker, {
            f"{dev}/gw-2/state": _state(False),
            f"{dev}/gw-1/reported": _reported("gw-1", [_serving("digits", "5")], gpus=["Orin"]),
            f"{dev}/nx-4/state": _state(True),
        }, retain=True)
        _publish(broker, {
            f"{dev}/gw-1/telemetry": _telemetry({"digits:5": (10, 7, 42.0)}, queue=11),
            f"{dev}/gw-1/events": {"type": "deploy_finished", "device_id": "gw-1"},
        }, retain=False)
        _until(lambda: (r := row("gw-2")) and r["online"] == "false", "gw-2 going offline")
        _until(lambda: (r := row("gw-1")) and "digits:5" in r["text"]
               and "queue 11" in r["text"] and "p95 42.0 ms, 7 err" in r["text"],
               "gw-1's new version and health")
        _until(lambda: row("nx-4"), "a new device")
        _until(lambda: "deploy_finished" in js(
            "return document.getElementById('events').innerText"), "a new event")
        live_update_s = time.monotonic() - t1
        assert js("return window.__sameDocument") == "yes"  # no reload happened
        assert js("return document.getElementById('n-offline').innerText") == "2"
        assert js("return document.getElementById('n-devices').innerText") == "4"

        # Screenshot of the whole page: a test artifact, and docs/dashboard.png on request.
        width, height = js("return [document.documentElement.scrollWidth, "
                           "document.documentElement.scrollHeight]")
        png = driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}})["data"]
        shot = tmp_path / "dashboard.png"
        shot.write_bytes(base64.b64decode(png))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("EDGE_UPDATE_DOCS_SCREENSHOT") == "1":
            _small_png(shot, ROOT / "docs" / "dashboard.png")
        print(f"dashboard: first render {first_render_s:.2f} s, live update "
              f"{live_update_s:.2f} s, screenshot {shot}")
    finally:
        server.shutdown()
        controller.stop()


def _small_png(src: Path, dst: Path) -> None:
    """A palette PNG (a few dozen KiB) for the docs; a plain copy without Pillow."""
    try:
        from PIL import Image
    except ImportError:
        shutil.copyfile(src, dst)
        return
    with Image.open(src) as im:
        im.convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(
            dst, optimize=True)
