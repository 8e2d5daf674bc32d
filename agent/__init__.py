"""edge-agent: the inference daemon that runs on each gateway."""

from importlib.metadata import PackageNotFoundError, version


def _installed_version() -> str:
    # pyproject.toml says the version; the installed distribution is how a program reads it.
    try:
        return version("edgeinfer")
    except PackageNotFoundError:  # a source tree run without being installed
        return "0+unknown"


__version__ = _installed_version()
