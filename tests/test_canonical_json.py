"""The canonical JSON that manifest signatures cover is RFC 8785 (JCS), checked against the
RFC's own published examples, so a signer in another language can reproduce it.

Source of every vector below: RFC 8785, "JSON Canonicalization Scheme (JCS)", A. Rundgren,
B. Jordan, S. Erdtman, June 2020, https://www.rfc-editor.org/rfc/rfc8785 : section 3.2.2
(the example of sorting-free serialization), section 3.2.3 (the sorting example), and
Appendix B ("Number Serialization Samples": IEEE 754 bit patterns and their strings).
"""

from __future__ import annotations

import math
import struct

import msgspec
import pytest

from edgeinfer.contract.manifest import ManifestError, canonical_json, decode_published


def _jcs(json_text: str) -> bytes:
    """Decode as the agent decodes a manifest (msgspec), then canonicalize."""
    return canonical_json(msgspec.json.decode(json_text.encode()))


def test_rfc8785_section_3_2_2_example() -> None:
    source = r'''{
      "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
      "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
      "literals": [null, true, false]
    }'''
    expected = (r'{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
                r'''"string":"€$\u000f\nA'B\"\\\\\"/"}''')
    assert _jcs(source) == expected.encode("utf-8")


def test_rfc8785_section_3_2_3_sorting_by_utf16_code_units() -> None:
    source = r'''{
      "\u20ac": "Euro Sign",
      "\r": "Carriage Return",
      "\ufb33": "Hebrew Letter Dalet With Dagesh",
      "1": "One",
      "\ud83d\ude00": "Emoji: Grinning Face",
      "\u0080": "Control",
      "\u00f6": "Latin Small Letter O With Diaeresis"
    }'''
    got = msgspec.json.decode(_jcs(source))
    assert list(got.values()) == [
        "Carriage Return", "One", "Control", "Latin Small Letter O With Diaeresis",
        "Euro Sign", "Emoji: Grinning Face", "Hebrew Letter Dalet With Dagesh",
    ]
    # Code point order (Python's sorted) would put U+FB33 before U+1F600: JCS does not.
    assert sorted(got)[-1] == "\U0001f600"


# RFC 8785 Appendix B, finite samples: IEEE 754 double (hex) -> its JCS string.
APPENDIX_B = [
    ("0000000000000000", "0"),
    ("8000000000000000", "0"),
    ("0000000000000001", "5e-324"),
    ("8000000000000001", "-5e-324"),
    ("7fefffffffffffff", "1.7976931348623157e+308"),
    ("ffefffffffffffff", "-1.7976931348623157e+308"),
    ("4340000000000000", "9007199254740992"),
    ("c340000000000000", "-9007199254740992"),
    ("4430000000000000", "295147905179352830000"),
    ("44b52d02c7e14af5", "9.999999999999997e+22"),
    ("44b52d02c7e14af6", "1e+23"),
    ("44b52d02c7e14af7", "1.0000000000000001e+23"),
    ("444b1ae4d6e2ef4e", "999999999999999700000"),
    ("444b1ae4d6e2ef4f", "999999999999999900000"),
    ("444b1ae4d6e2ef50", "1e+21"),
    ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"),
    ("3eb0c6f7a0b5ed8d", "0.000001"),
    ("41b3de4355555553", "333333333.3333332"),
    ("41b3de4355555554", "333333333.33333325"),
    ("41b3de4355555555", "333333333.3333333"),
    ("41b3de4355555556", "333333333.3333334"),
    ("41b3de4355555557", "333333333.33333343"),
    ("becbf647612f3696", "-0.0000033333333333333333"),
    ("43143ff3c1cb0959", "1424953923781206.2"),  # round to even
]


def _double(bits: str) -> float:
    value: float = struct.unpack(">d", bytes.fromhex(bits))[0]
    return value


@pytest.mark.parametrize(("bits", "expected"), APPENDIX_B)
def test_rfc8785_appendix_b_numbers(bits: str, expected: str) -> None:
    assert canonical_json(_double(bits)) == expected.encode()
    # And inside a document, as a signer's manifest carries them.
    assert canonical_json({"n": [_double(bits)]}) == b'{"n":[' + expected.encode() + b"]}"


@pytest.mark.parametrize("bits", ["7fffffffffffffff", "7ff0000000000000", "fff0000000000000"],
                         ids=["NaN", "Infinity", "-Infinity"])
def test_rfc8785_appendix_b_nan_and_infinity_are_refused(bits: str) -> None:
    assert not math.isfinite(_double(bits))
    with pytest.raises(ManifestError, match="RFC 8785"):
        canonical_json({"health": {"atol": _double(bits)}})


def test_integers_as_integers_and_strings_escaped_only_where_jcs_says() -> None:
    assert canonical_json({"size": 10, "rtol": 1.0, "atol": 1e-05, "x": -0.0}) == (
        b'{"atol":0.00001,"rtol":1,"size":10,"x":0}')
    # Only \" \\ \b \f \n \r \t and \u00xx (lowercase) for the other controls; "/", DEL,
    # U+2028 and everything beyond ASCII are written as they are, in UTF-8.
    text = "\"\\\b\f\n\r\t\x00\x1f/\x7f\u2028é\U0001f600"
    assert canonical_json(text) == (
        '"\\"\\\\\\b\\f\\n\\r\\t\\u0000\\u001f/\x7f\u2028é\U0001f600"'.encode())


def test_integers_a_javascript_signer_would_round_are_refused() -> None:
    assert canonical_json(2**53 - 1) == b"9007199254740991"
    with pytest.raises(ManifestError, match="RFC 8785"):
        canonical_json({"revision": 2**53 + 1})
    # As the agent reads a manifest: refused as `invalid`, never signed bytes of a rounding.
    with pytest.raises(ManifestError, match="RFC 8785") as info:
        decode_published(b'{"revision": 9007199254740993, "models": []}')
    assert info.value.reason == "invalid"
