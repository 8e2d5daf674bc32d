"""A local model folder (`models.local_dir`) served by a real agent process on a real
mosquitto, with no controller: versions swap in as their folders appear and drain out as
they go, broken folders are refused while the rest serve, and a name the fleet's manifest
also holds is the manifest's (tests/deploydevice.py: the models, the Device)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeinfer.fleet.client import InferenceClient
from tests.broker import Broker
from tests.deploydevice import MODEL, Device, Models, answers


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("local-models")


@pytest.fixture(scope="module")
def device(module_broker: Broker, deploy_models: Models, local: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Device]:
    _put(local / MODEL / "1", deploy_models.v1)
    dev = Device(tmp_path_factory.mktemp("gw"), module_broker, "gw-local",
                 models={"local_dir": str(local), "scan_interval_s": 0.2})
    dev.start()
    try:
        yield dev
    finally:
        dev.close()


def _put(folder: Path, model: Path, **extra: str) -> None:
    folder.mkdir(parents=True)
    shutil.copyfile(model, folder / "model.onnx")
    for name, text in extra.items():
        (folder / name).write_text(text)


def test_the_folder_serves_swaps_drains_and_refuses_without_a_controller(
        device: Device, module_client: InferenceClient, deploy_models: Models,
        local: Path) -> None:
    device.event("model_serving", model=MODEL, version="1")
    answers(module_client, device.id, "1", 1.0)
    assert device.reported()["revision"] is None  # no manifest ever came

    # A new version folder swaps in; the old version drains and unloads.
    mark = device.mark()
    _put(local / MODEL / "2", deploy_models.v2)
    device.event("model_serving", after=mark, model=MODEL, version="2")
    device.event("model_unloaded", after=mark, model=MODEL, version="1")
    answers(module_client, device.id, "2", 2.0)

    # Broken folders are refused, named with the reason; m keeps serving.
    mark = device.mark()
    _put(local / "junk" / "1", deploy_models.garbage)
    _put(local / "typo" / "1", deploy_models.v1, **{"model.yaml": "batchin:\n  max_batch: 4\n"})
    junk = device.event("local_model_refused", after=mark, model="junk", reason="load")
    assert junk["folder"] == str(local / "junk" / "1") and "junk:1" in junk["message"]
    typo = device.event("local_model_refused", after=mark, model="typo", reason="invalid")
    assert f"{local / 'typo' / '1' / 'model.yaml'}: key 'batchin' is not a model.yaml key" in (
        typo["message"])
    answers(module_client, device.id, "2", 2.0)
    assert "key 'batchin'" in device.reported()["last_error"]

    # The newest folder removed: it drains, the previous version serves again.
    mark = device.mark()
    shutil.rmtree(local / MODEL / "2")
    device.event("model_unloaded", after=mark, model=MODEL, version="2")
    device.event("model_serving", after=mark, model=MODEL, version="1")
    answers(module_client, device.id, "1", 1.0)

    # The fleet deploys the same name: the manifest's version serves, the folder's is
    # refused, naming the name, the folder and the manifest's revision.
    mark = device.mark()
    assert device.deploy("--version", "f1", "--file", str(deploy_models.v2), "--wait", "60") == 0
    revision = device.reported()["revision"]
    conflict = device.event("local_model_refused", after=mark, model=MODEL, reason="conflict")
    assert conflict["revision"] == revision
    assert (f"model {MODEL} is both in {local / MODEL} and in manifest revision {revision}"
            in conflict["message"])
    answers(module_client, device.id, "f1", 2.0)
    served = {(m["name"], m["version"]) for m in device.reported()["models"]
              if m["state"] == "serving"}
    assert (MODEL, "f1") in served and (MODEL, "1") not in served
