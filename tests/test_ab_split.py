"""A/B and shadow versions: the manifest's rules (`traffic`, `shadow`) and the split."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from edgeinfer.contract.manifest import (
    Manifest,
    ManifestError,
    ModelSpec,
    decode_manifest,
)
from edgeinfer.contract.traffic import pick_version, traffic_bucket
from edgeinfer.fleet.abtest import VersionsError, name_versions, parse_traffic
from edgeinfer.fleet.deploy import DeployError, next_manifest

SHA = "ab" * 32


def _entry(version: str, **extra: Any) -> dict[str, Any]:
    return {"name": "m", "version": version, "uri": "file:///m.onnx", "sha256": SHA,
            "size": 1, **extra}


def _manifest(*entries: dict[str, Any]) -> bytes:
    return msgspec.json.encode({"revision": 1, "models": list(entries)})


def test_weights_adding_up_to_100_are_accepted() -> None:
    m = decode_manifest(_manifest(_entry("1", traffic=70), _entry("2", traffic=30)))
    assert [(s.version, s.traffic) for s in m.models] == [("1", 70), ("2", 30)]
    shadowed = decode_manifest(_manifest(_entry("1"), _entry("2", shadow=True)))
    assert [s.shadow for s in shadowed.models] == [False, True]


@pytest.mark.parametrize(("entries", "needle"), [
    ((_entry("1", traffic=60), _entry("2", traffic=30)),
     "'models[1].traffic': the traffic of m's versions adds up to 90, not 100"),
    ((_entry("1", traffic=100),), "'models[0].traffic': m:1 is the only serving version"),
    ((_entry("1", traffic=70), _entry("2")), "'models[1].traffic': missing for m:2"),
    ((_entry("1", traffic=101), _entry("2", traffic=0)), "models[0].traffic"),
    ((_entry("1", traffic="x"), _entry("2", traffic=50)), "models[0].traffic"),
    ((_entry("1"), _entry("2", shadow=True, traffic=10)),
     "'models[1].traffic': shadow version m:2"),
    ((_entry("2", shadow=True),), "'models[0].shadow': shadow version m:2 has no serving"),
    ((_entry("1"), _entry("2", shadow=True), _entry("3", shadow=True)),
     "'models[2].shadow': m has more than one shadow"),
])
def test_bad_traffic_and_shadow_are_refused_naming_the_entry(
        entries: tuple[dict[str, Any], ...], needle: str) -> None:
    with pytest.raises(ManifestError) as info:
        decode_manifest(_manifest(*entries))
    assert needle in str(info.value)


def test_the_split_is_deterministic_and_follows_the_weights() -> None:
    weighted = [("1", 70), ("2", 30)]
    ids = [f"job-{i}" for i in range(4000)]
    picks = [pick_version(weighted, i) for i in ids]
    assert picks == [pick_version(weighted, i) for i in ids]  # the same id, the same version
    share = picks.count("2") / len(picks)
    assert 0.27 < share < 0.33, share
    assert all(0 <= traffic_bucket(i) < 100 for i in ids[:200])
    # The buckets: version 1 takes [0, 70), version 2 [70, 100).
    assert all((traffic_bucket(i) >= 70) == (p == "2") for i, p in zip(ids, picks, strict=True))
    assert {pick_version([("a", 0), ("b", 100)], i) for i in ids[:200]} == {"b"}


def test_the_agent_picks_by_weight_and_never_a_shadow() -> None:
    from types import SimpleNamespace
    from typing import cast

    from edgeinfer.agent.served import ServingModel, _unnamed

    def model(version: str, **extra: Any) -> ServingModel:
        fields = {"version": version, "traffic": None, "shadow": False, **extra}
        return cast(ServingModel, SimpleNamespace(spec=SimpleNamespace(**fields)))

    a, b = model("1", traffic=70), model("2", traffic=30)
    for i in (f"job-{n}" for n in range(300)):
        assert _unnamed([a, b], i).spec.version == pick_version([("1", 70), ("2", 30)], i)
    plain, shadow = model("1"), model("2", shadow=True)
    assert {_unnamed([plain, shadow], f"j{n}").spec.version for n in range(50)} == {"1"}
    assert _unnamed([a, b], None) is b  # no key: the last serving version


# --- edge-fleet deploy --traffic / --shadow (fleet/abtest.py) --------------------------------


def _desired(*entries: dict[str, Any]) -> Manifest:
    return decode_manifest(_manifest(*entries))


def _versions(new: str, current: Manifest | None, traffic: list[tuple[str, int]],
              shadow: str | None) -> list[tuple[str, int | None, bool]]:
    spec = msgspec.convert(_entry(new), ModelSpec)
    manifest = next_manifest(current, upsert=spec,
                             versions=name_versions(spec, current, traffic, shadow))
    return [(m.version, m.traffic, m.shadow) for m in manifest.models if m.name == "m"]


def test_deploy_flags_put_the_named_versions_of_a_name_in_the_next_manifest() -> None:
    one = _desired(_entry("1"), {**_entry("x"), "name": "other"})
    assert _versions("2", one, [("1", 70), ("2", 30)], None) == [("1", 70, False),
                                                                  ("2", 30, False)]
    ab = _desired(_entry("1", traffic=70), _entry("2", traffic=30))
    # The deployed version as the shadow keeps the serving versions as they were.
    assert _versions("3", ab, [], "3") == [("1", 70, False), ("2", 30, False), ("3", None, True)]
    # Another version as the shadow: the deployed one serves alone beside it.
    assert _versions("3", ab, [], "1") == [("3", None, False), ("1", None, True)]
    # The deployed version was one of an A/B pair: the other serves alone, unweighted.
    assert _versions("2", ab, [], "2") == [("1", None, False), ("2", None, True)]
    assert parse_traffic(["1=70", "b.2=30"]) == [("1", 70), ("b.2", 30)]


@pytest.mark.parametrize(("current", "new", "traffic", "shadow", "needle"), [
    (None, "2", [("1", 50), ("2", 50)], None,
     "--traffic 1=50: m:1 is neither the version deployed (2) nor in the desired manifest"),
    (None, "2", [("2", 100)], "2", "--shadow 2: a shadow gets a copy of each job, not a share"),
    (_desired(_entry("1"), _entry("3")), "2", [("1", 50), ("3", 50)], None,
     "--version 2 is named by neither --traffic nor --shadow"),
])
def test_deploy_flags_that_name_impossible_versions_are_refused(
        current: Manifest | None, new: str, traffic: list[tuple[str, int]], shadow: str | None,
        needle: str) -> None:
    with pytest.raises(VersionsError) as info:
        name_versions(msgspec.convert(_entry(new), ModelSpec), current, traffic, shadow)
    assert needle in str(info.value)


@pytest.mark.parametrize(("desired", "traffic", "shadow", "needle"), [
    (True, [("1", 60), ("2", 30)], None, "the traffic of m's versions adds up to 90, not 100"),
    (False, [], "2", "shadow version m:2 has no serving version of m beside it"),
])
def test_deploy_flags_breaking_the_manifest_rules_are_refused_before_publishing(
        desired: bool, traffic: list[tuple[str, int]], shadow: str | None, needle: str) -> None:
    with pytest.raises(DeployError) as info:
        _versions("2", _desired(_entry("1")) if desired else None, traffic, shadow)
    assert "the next manifest would be refused" in str(info.value)
    assert needle in str(info.value)
    for bad in (["1"], ["1=x"], ["=5"], ["1=5", "1=6"]):
        with pytest.raises(VersionsError):
            parse_traffic(bad)
