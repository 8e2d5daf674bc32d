"""edgeinfer: machine-learning inference on edge gateways, steered over MQTT.

The floors, each importing only those below it (docs/architecture.md):

- edgeinfer (configfile, cliargs, structcheck) and edgeinfer.contract: the wire contract
  and the conventions both sides share;
- edgeinfer.runtimes: hardware detection, runtime backends, task pipelines;
- edgeinfer.agent: the daemon on each gateway;
- edgeinfer.fleet: the operator's side and the job client SDK, which stands on the
  contract alone, never on the agent.
"""

from importlib.metadata import PackageNotFoundError, version


def _installed_version() -> str:
    # pyproject.toml says the version; the installed distribution is how a program reads it.
    try:
        return version("edgeinfer")
    except PackageNotFoundError:  # a source tree run without being installed
        return "0+unknown"


__version__ = _installed_version()
