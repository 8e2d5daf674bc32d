"""Several versions of one name at once: the entries `edge-fleet deploy --traffic
VERSION=WEIGHT ... --shadow VERSION` puts in the next manifest (docs/protocol.md "A/B and
shadow versions").

With either flag, the deployed name's entries become exactly the versions the flags name:

- `--traffic V=W` (repeatable): the serving versions, in this order (the order of the
  split's bucket ranges), with these weights;
- `--shadow V`: the shadow. Without `--traffic`, the serving versions are the deployed one
  when it is not the shadow, else those of the desired manifest, as they were (one left
  alone loses its weight).

A version named is the one deployed (`--version`) or a version of the name in the desired
manifest; other versions of the name are dropped. The manifest's own rules (weights adding
up to 100, a shadow beside a serving version, ...) are checked as the agent checks them
when the next manifest is built (fleet/deploy.py `next_manifest`).
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from edgeinfer.contract.manifest import Manifest, ModelSpec


class VersionsError(ValueError):
    """Flags that name versions which cannot be put together; the message says which."""


def parse_traffic(items: Sequence[str]) -> list[tuple[str, int]]:
    """`--traffic` values (`VERSION=WEIGHT`) as (version, weight) pairs, in order."""
    out: list[tuple[str, int]] = []
    for item in items:
        version, sep, weight = item.partition("=")
        if not sep or not version or not weight.strip().isdigit():
            raise VersionsError(f"--traffic {item!r}: expected VERSION=WEIGHT, WEIGHT a whole "
                                "number of percent (0-100), e.g. --traffic 1=70 --traffic 2=30")
        if any(v == version for v, _ in out):
            raise VersionsError(f"--traffic names version {version!r} twice")
        out.append((version, int(weight)))
    return out


def name_versions(new: ModelSpec, current: Manifest | None, traffic: Sequence[tuple[str, int]],
                  shadow: str | None) -> list[ModelSpec]:
    """The entries of `new.name` in the next manifest (the module's docstring)."""
    desired = {m.version: m for m in (current.models if current else []) if m.name == new.name}
    desired[new.version] = new  # the deployed entry replaces a desired one of its version

    def entry(version: str, flag: str) -> ModelSpec:
        if version not in desired:
            others = ", ".join(v for v in desired if v != new.version) or "none"
            raise VersionsError(
                f"{flag}: {new.name}:{version} is neither the version deployed "
                f"({new.version}) nor in the desired manifest (its versions of {new.name}: "
                f"{others}); deploy it first")
        return desired[version]

    if shadow is not None and any(v == shadow for v, _ in traffic):
        raise VersionsError(f"--shadow {shadow}: a shadow gets a copy of each job, not a "
                            f"share; drop it from --traffic")
    if traffic:
        serving = [msgspec.structs.replace(entry(v, f"--traffic {v}={w}"), traffic=w,
                                           shadow=False) for v, w in traffic]
    elif shadow == new.version:
        serving = [m for m in desired.values() if not m.shadow and m.version != new.version]
        if len(serving) == 1:  # what was an A/B pair: the one left serves alone, unweighted
            serving = [msgspec.structs.replace(serving[0], traffic=None)]
    else:
        serving = [msgspec.structs.replace(new, traffic=None, shadow=False)]
    if shadow is not None:
        serving.append(msgspec.structs.replace(entry(shadow, f"--shadow {shadow}"),
                                               traffic=None, shadow=True))
    if all(m.version != new.version for m in serving):
        raise VersionsError(f"--version {new.version} is named by neither --traffic nor "
                            f"--shadow: say how {new.name}:{new.version} serves")
    return serving
