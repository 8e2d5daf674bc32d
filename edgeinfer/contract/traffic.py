"""The A/B split (docs/protocol.md, "A/B and shadow"): which of a name's versions a job
that names none gets, deterministically by its id. The manifest's rules on `traffic`
(edgeinfer/contract/manifest.py check_versions) and the agent's pick (agent/served.py)
read it from here."""

from __future__ import annotations

import hashlib

# The serving versions of one name carry traffic weights that add up to this.
TRAFFIC_TOTAL = 100


def traffic_bucket(key: str) -> int:
    """Where a job falls in [0, 100): the first 8 bytes of sha256(key) modulo 100. `key`
    is the job's id (or, for a job without one, its request digest)."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % TRAFFIC_TOTAL


def pick_version(weighted: list[tuple[str, int]], key: str) -> str:
    """The version a job that names none gets: `weighted` is (version, traffic) in manifest
    order; version i takes the buckets from the sum of the weights before it to that sum
    plus its own."""
    bucket = traffic_bucket(key)
    upto = 0
    for version, weight in weighted:
        upto += weight
        if bucket < upto:
            return version
    return weighted[-1][0]
