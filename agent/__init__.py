"""edge-agent: the inference daemon that runs on each gateway."""

__version__ = "0.1.0"
