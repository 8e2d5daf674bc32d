"""The local model folder's reading (agent/local_models.py): version folders into
ModelSpecs, model.yaml checked like a manifest entry, a folder taken only once stable,
versions newest first, and a name the fleet's manifest also holds refused."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from edgeinfer.agent.config import ConfigError, load_config
from edgeinfer.agent.local_models import LocalFolder, LocalScan, natural_key, split_conflicts
from edgeinfer.agent.preflight import environment_problems

pytestmark = pytest.mark.unit


def _version(root: Path, name: str, version: str, files: dict[str, bytes | str]) -> Path:
    folder = root / name / version
    folder.mkdir(parents=True)
    for file, data in files.items():
        (folder / file).write_bytes(data.encode() if isinstance(data, str) else data)
    return folder


def _stable(folder: LocalFolder) -> LocalScan:
    """Two looks: the second takes what the first saw unchanged."""
    folder.scan()
    return folder.scan()


def test_a_folder_is_taken_once_two_looks_agree_and_its_last_reading_stands_while_it_changes(
        tmp_path: Path) -> None:
    folder = _version(tmp_path, "digits", "1", {"model.onnx": b"first"})
    local = LocalFolder(tmp_path)
    assert local.scan().versions == {}  # seen once: maybe half-copied
    spec = local.scan().versions["digits"][0].spec
    assert (spec.name, spec.version, spec.size) == ("digits", "1", 5)
    assert spec.sha256 == hashlib.sha256(b"first").hexdigest()
    assert spec.uri == (folder / "model.onnx").as_uri()

    (folder / "model.onnx").write_bytes(b"second!")
    os.utime(folder / "model.onnx", ns=(1, 1))
    assert local.scan().versions["digits"][0].spec == spec  # changing: the old reading
    again = local.scan().versions["digits"][0].spec  # settled: read again
    assert again.sha256 == hashlib.sha256(b"second!").hexdigest()

    (folder / "model.onnx").unlink()
    folder.rmdir()
    assert local.scan().versions == {}  # removed: gone at once


def test_versions_come_newest_first_in_natural_order(tmp_path: Path) -> None:
    for version in ("2", "10", "9"):
        _version(tmp_path, "m", version, {"model.onnx": version})
    got = [v.spec.version for v in _stable(LocalFolder(tmp_path)).versions["m"]]
    assert got == ["10", "9", "2"]
    assert sorted(["v10", "v9", "1.10", "1.2"], key=natural_key) == ["1.2", "1.10", "v9", "v10"]


def test_model_yaml_gives_the_entry_its_other_fields_and_side_files_come_along(
        tmp_path: Path) -> None:
    _version(tmp_path, "enc", "3", {
        "encoder.onnx": b"model",
        "vocab.txt": "a\nb\n",
        "notes.md": "not for the model",
        "model.yaml": "task: tensor\nruntime:\n  prefer: [onnxruntime]\n"
                      "batching:\n  max_batch: 4\n  max_delay_ms: 2\ninstances: 2\n"
                      "files: [vocab.txt]\n",
    })
    _version(tmp_path, "plain", "1", {"model.onnx": b"m", "labels.txt": "cat\n"})
    scan = _stable(LocalFolder(tmp_path))
    assert scan.refused == []
    spec = scan.versions["enc"][0].spec
    assert spec.uri.endswith("/enc/3/encoder.onnx")  # the folder's only .onnx file
    assert spec.runtime.prefer == ["onnxruntime"]
    assert (spec.batching.max_batch, spec.batching.max_delay_ms, spec.instances) == (4, 2.0, 2)
    assert [(f.name, f.size, f.sha256) for f in spec.files] == [
        ("vocab.txt", 4, hashlib.sha256(b"a\nb\n").hexdigest())]
    # Without `files`, every other file of the folder goes beside the model.
    assert [f.name for f in scan.versions["plain"][0].spec.files] == ["labels.txt"]


@pytest.mark.parametrize(("files", "needle"), [
    ({"model.onnx": b"m", "model.yaml": "colour: blue\n"},
     "model.yaml: key 'colour' is not a model.yaml key"),
    ({"model.onnx": b"m", "model.yaml": "batching:\n  max_batch: 0\n"},
     "model.yaml: key 'batching.max_batch'"),
    ({"model.onnx": b"m", "model.yaml": "version: '2'\n"}, "key 'version' is not a model.yaml"),
    ({"model.onnx": b"m", "model.yaml": "task: [\n"}, "model.yaml: line 2: not valid YAML"),
    ({"model.onnx": b"m", "model.yaml": "files: [nope.txt]\n"}, "'nope.txt' is not a file"),
    ({"labels.txt": "x"}, "no model file (put the model in it as model.onnx)"),
    ({"a.onnx": b"a", "b.onnx": b"b"}, "several .onnx files (a.onnx, b.onnx) and no model.onnx"),
    ({"model.onnx": b""}, "model.onnx is empty"),
])
def test_a_folder_that_is_no_model_version_is_refused_naming_it_and_why(
        tmp_path: Path, files: dict[str, bytes | str], needle: str) -> None:
    folder = _version(tmp_path, "bad", "1", files)
    _version(tmp_path, "good", "1", {"model.onnx": b"m"})
    scan = _stable(LocalFolder(tmp_path))
    assert list(scan.versions) == ["good"]  # the others are still read
    [refusal] = scan.refused
    assert refusal.folder == folder and (refusal.model, refusal.version) == ("bad", "1")
    assert str(folder) in refusal.message and needle in refusal.message, refusal.message


def test_what_is_not_a_name_version_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "README.txt").write_text("hi")
    (tmp_path / "bad name").mkdir()
    (tmp_path / ".partial").mkdir()  # hidden: a copy tool's, left alone
    _version(tmp_path, "m", "1", {"model.onnx": b"m"}).joinpath("sub").mkdir()
    messages = [r.message for r in _stable(LocalFolder(tmp_path)).refused]
    assert len(messages) == 3, messages
    assert "README.txt: not a folder" in messages[0]
    assert "'bad name' is no model name" in messages[1]
    assert "m/1: sub is not a file" in messages[2]
    missing = LocalFolder(tmp_path / "absent").scan()
    assert "absent is not a folder" in missing.refused[0].message


def test_a_name_in_the_folder_and_the_manifest_is_refused_naming_both(tmp_path: Path) -> None:
    _version(tmp_path, "shared", "1", {"model.onnx": b"m"})
    _version(tmp_path, "mine", "1", {"model.onnx": b"m"})
    wanted, refused = split_conflicts(_stable(LocalFolder(tmp_path)), {"shared"}, 7)
    assert list(wanted) == ["mine"]
    [conflict] = refused
    assert conflict.reason == "conflict" and conflict.revision == 7
    assert f"model shared is both in {tmp_path / 'shared'} and in manifest revision 7" in (
        conflict.message)


def test_local_dir_must_be_an_absolute_path(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("models:\n  local_dir: models\n")
    with pytest.raises(ConfigError, match=r"key 'models\.local_dir': 'models' must be an absolute"):
        load_config(config, environ={})
    config.write_text(f"models:\n  local_dir: {tmp_path}\n  scan_interval_s: 0.2\n")
    assert load_config(config, environ={}).models.scan_interval_s == 0.2


def test_validate_config_warns_of_a_local_dir_that_is_not_there(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\nbroker:\n  url: mqtt://127.0.0.1\n"
                      f"models:\n  local_dir: {tmp_path / 'absent'}\n")
    [problem] = environment_problems(load_config(config, environ={}))
    assert problem.key == "models.local_dir" and not problem.lasting
    assert "absent is not a folder (yet)" in problem.message
