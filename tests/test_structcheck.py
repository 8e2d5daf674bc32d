"""edgeinfer/structcheck.py: key paths and messages of our own, whatever msgspec's wording."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
import pytest

from edgeinfer.structcheck import StructError, convert, describe, not_utf8, wants_text


class Leaf(msgspec.Struct, forbid_unknown_fields=True):
    sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{4}$")]
    size: Annotated[int, msgspec.Meta(ge=1)] = 1


class Jobs(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    workers: Annotated[int, msgspec.Meta(ge=1, le=64)] = 2
    delay_s: Annotated[float, msgspec.Meta(gt=0)] | None = None
    mode: Literal["fast", "slow"] = "fast"


class Root(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str = "x"
    jobs: Jobs = msgspec.field(default_factory=Jobs)
    leaves: list[Leaf] = msgspec.field(default_factory=list)
    size: tuple[int, int] | None = None
    extra: dict[str, Any] = msgspec.field(default_factory=dict)
    leaf: Leaf | None = None


def problem(data: Any, *, lax: bool = False) -> StructError:
    with pytest.raises(StructError) as info:
        convert(data, Root, lax=lax)
    return info.value


def test_good_data_converts() -> None:
    root = convert({"jobs": {"workers": 3, "delay_s": 1}, "leaves": [{"sha256": "ab12"}],
                    "size": [2, 3], "leaf": None}, Root)
    assert root.jobs.workers == 3 and root.jobs.delay_s == 1.0
    assert root.leaves == [Leaf("ab12", 1)] and root.size == (2, 3)


def test_unknown_key_names_its_path_and_the_known_keys() -> None:
    err = problem({"jobs": {"worker": 3}})
    assert err.path == "jobs.worker"
    assert str(err) == "key 'jobs.worker': unknown key (known keys: workers, delay_s, mode)"
    assert problem({"colour": "blue"}).path == "colour"


def test_ill_typed_value_says_what_was_expected_and_what_came() -> None:
    err = problem({"jobs": {"workers": "many"}})
    assert str(err) == "key 'jobs.workers': expected an integer >= 1 and <= 64, got 'many'"
    assert problem({"jobs": {"workers": True}}).problem.endswith("got true")
    assert problem({"jobs": []}).problem == "expected a mapping, got a list of 0 item(s)"


def test_constraint_violation() -> None:
    assert problem({"jobs": {"workers": 65}}).problem == (
        "expected an integer >= 1 and <= 64, got 65")
    assert problem({"jobs": {"mode": "medium"}}).problem == (
        "expected one of 'fast', 'slow', got 'medium'")


def test_list_index_in_the_path() -> None:
    err = problem({"leaves": [{"sha256": "ab12"}, {"sha256": "XYZ"}]})
    assert err.path == "leaves[1].sha256"
    assert err.problem == "expected a string matching ^[0-9a-f]{4}$, got 'XYZ'"
    assert problem({"size": [1, "b"]}).path == "size[1]"
    assert problem({"size": [1]}).problem == "expected a list of 2 items or null, got a list of 1 item(s)"


def test_union_with_none() -> None:
    assert convert({"jobs": {"delay_s": None}}, Root).jobs.delay_s is None
    err = problem({"jobs": {"delay_s": 0}})
    assert str(err) == "key 'jobs.delay_s': expected a number > 0 or null, got 0"
    # A struct-or-None names the key inside the struct, not just "a mapping or null".
    assert problem({"leaf": {"sha256": "ab12", "size": 0}}).path == "leaf.size"


def test_missing_required_key() -> None:
    err = problem({"leaves": [{"size": 3}]})
    assert str(err) == "key 'leaves[0].sha256': required key is missing"


def test_top_level_that_is_not_a_mapping() -> None:
    err = problem([1, 2])
    assert err.path == "" and str(err) == "expected a mapping, got a list of 2 item(s)"


def test_dict_values_are_walked_with_their_key() -> None:
    class Keys(msgspec.Struct, forbid_unknown_fields=True):
        keys: dict[str, int]

    with pytest.raises(StructError, match=r"^key 'keys\.fleet-1': expected an integer, got 'x'$"):
        convert({"keys": {"fleet-1": "x"}}, Keys)


def test_lax_takes_what_a_person_types() -> None:
    root = convert({"jobs": {"workers": "4", "delay_s": "1e3"}}, Root, lax=True)
    assert (root.jobs.workers, root.jobs.delay_s) == (4, 1000.0)
    assert convert({"jobs": {"workers": 4.0}}, Root, lax=True).jobs.workers == 4
    assert problem({"jobs": {"workers": "4"}}).problem.endswith("got '4'")  # strict: no
    assert problem({"jobs": {"workers": "4.5"}}, lax=True).path == "jobs.workers"


def test_describe_and_wants_text() -> None:
    assert describe(msgspec.inspect.type_info(Annotated[str, msgspec.Meta(min_length=1)] | None)) == (
        "a string of at least 1 character(s) or null")
    assert wants_text(Root, ["name"]) and wants_text(Root, ["leaf", "sha256"])
    assert not wants_text(Root, ["jobs", "workers"]) and not wants_text(Root, ["nope"])


def test_not_utf8_says_where() -> None:
    assert not_utf8(b'{"a": "\xd2"}') == "invalid continuation byte at byte 7"
    assert not_utf8("é".encode()) is None
