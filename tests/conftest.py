"""Fixtures every test module may take, and the rule that marks each test `unit` or
`integration` (tests/README.md).

The rule: a test is `integration` when it can start another program (mosquitto, an agent
process, PostgreSQL, any subprocess): its own code, a fixture it takes (directly or through
other fixtures) or a helper of tests/ that either calls names one of `STARTERS`. Every other
test is `unit`: in-process, on fakes, real files and real runtimes. A test marked
`@pytest.mark.unit` or `@pytest.mark.integration` by hand keeps its mark.
"""

from __future__ import annotations

import inspect
import subprocess
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.models import RAPIDOCR_MODELS, DigitsModel, build_digits, rapidocr_models_dir
from bench.tinylm import TinyLm, build_tiny_lm
from bench.tinyvlm import TinyVlm, build_tiny_vlm
from edgeinfer.fleet.client import InferenceClient
from tests.broker import Broker
from tests.deploydevice import Models, build_models
from tests.pgtest import pg_schema_url
from tests.pki import Pki

# What starts another program: the broker, the agent process (tests/agentproc.py, found
# through its use of subprocess), the PostgreSQL schema (a server must answer) and
# subprocess itself.
STARTERS: tuple[object, ...] = (subprocess, Broker, pg_schema_url)


def _code_names(code: types.CodeType) -> Iterator[str]:
    """The global and attribute names a function's code uses, nested functions included."""
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_names(const)


def _functions(obj: object) -> list[types.FunctionType]:
    if isinstance(obj, types.FunctionType):
        return [obj]
    if isinstance(obj, type):
        return [f for f in vars(obj).values() if isinstance(f, types.FunctionType)]
    return []


def _starts_programs(obj: object, seen: set[int]) -> bool:
    """Whether `obj` names a starter, or calls a helper of tests/ that does."""
    if any(obj is s for s in STARTERS):
        return True
    if id(obj) in seen or not (getattr(obj, "__module__", None) or "").startswith("tests."):
        return False
    seen.add(id(obj))
    for func in _functions(inspect.unwrap(obj) if callable(obj) else obj):
        for name in set(_code_names(func.__code__)):
            if name in func.__globals__ and _starts_programs(func.__globals__[name], seen):
                return True
    return False


def _is_integration(item: pytest.Function) -> bool:
    seen: set[int] = set()
    if _starts_programs(item.function, seen):
        return True
    for name in item.fixturenames:
        for fixturedef in item._fixtureinfo.name2fixturedefs.get(name, ()):
            if _starts_programs(fixturedef.func, seen):
                return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[Any]) -> None:
    for item in items:
        if not isinstance(item, pytest.Function):
            continue
        if item.get_closest_marker("unit") or item.get_closest_marker("integration"):
            continue
        item.add_marker(pytest.mark.integration if _is_integration(item) else pytest.mark.unit)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A fresh mosquitto on a free loopback port, gone after the test."""
    b = Broker(tmp_path / "broker")
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="module")
def module_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One mosquitto for all the tests of a module, each on devices of its own."""
    b = Broker(tmp_path_factory.mktemp("broker"))
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="module")
def module_client(module_broker: Broker) -> Iterator[InferenceClient]:
    """A job client on `module_broker`, shared by the module's tests."""
    with InferenceClient(module_broker.url) as c:
        yield c


@pytest.fixture(scope="module")
def deploy_models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    """The models the deploy-safety modules deploy (tests/deploydevice.py): y = x, y = 2x,
    a NaN model, a slow one and random bytes; built once per module, only read."""
    return build_models(tmp_path_factory.mktemp("deploy-models"))


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Where the fleet registry lives, once per backend: a SQLite file in a folder not made
    yet, or a throwaway PostgreSQL schema (tests/pgtest.py: skips, with the reason, where
    no server answers)."""
    if request.param == "sqlite":
        yield str(tmp_path / "state" / "registry.sqlite3")
    else:
        with pg_schema_url() as url:
            yield url


@pytest.fixture(scope="session")
def ocr_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ocr version's folder from PaddleOCR's models in the rapidocr-onnxruntime wheel:
    det.onnx, rec.onnx, cls.onnx (the file stem is the role); skips where the wheel is not
    installed."""
    src = rapidocr_models_dir()
    if src is None:
        pytest.skip("the rapidocr-onnxruntime wheel is not installed (scripts/bootstrap.sh "
                    "installs it)")
    out = tmp_path_factory.mktemp("ocr-models")
    for role, name in RAPIDOCR_MODELS.items():
        (out / f"{role}.onnx").symlink_to(src / name)
    return out


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> DigitsModel:
    """scikit-learn's MLP on the 8x8 digits as digits.onnx, trained once for the whole run
    (tests read it, never change it)."""
    return build_digits(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A fleet CA with broker and client certificates, gw-revoked revoked, and a stranger CA
    (tests/pki.py); one per module, which reads it and never changes it."""
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for the models one module builds (bench/models.py), shared by its tests."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> TinyLm:
    """The tiny language model of bench/tinylm.py, trained once per run (~10 s): read-only
    for the tests that share it."""
    return build_tiny_lm(tmp_path_factory.mktemp("tinylm"))


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> TinyVlm:
    """The tiny vision-language model of bench/tinyvlm.py (encoder.onnx + decoder.onnx,
    captions of the digits), trained once per run (~5 s): read-only for the tests that
    share it."""
    return build_tiny_vlm(tmp_path_factory.mktemp("tinyvlm"))
