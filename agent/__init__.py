"""edge-agent: the inference daemon that runs on each gateway."""

from edgeinfer import __version__ as __version__
