"""What a valid config needs of the machine it runs on, checked before the agent starts.

`load_config` stays pure (it reads the config, never writes); these checks touch the
system and leave nothing behind: the state_dir can be created and written (a temporary
file or folder is made and removed again), the TLS and password files can be opened,
and the broker's host resolves. `edge-agent run --validate-config` reports every
problem; `edge-agent run` stops on a lasting one (exit 78, which systemd does not
restart) and only warns about one that may pass by itself (DNS not up yet at boot).
"""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgeinfer.agent.config import AgentConfig, BrokerConfig
from edgeinfer.contract.brokerurl import parse_broker_url

_PROBE_PREFIX = ".edge-agent-write-check-"


@dataclass(frozen=True)
class Problem:
    key: str
    message: str
    # False: it may mend itself without anyone changing anything (a name that does not
    # resolve while the network comes up), so `run` warns and goes on.
    lasting: bool = True

    def __str__(self) -> str:
        return f"key '{self.key}': {self.message}"


def environment_problems(cfg: AgentConfig) -> list[Problem]:
    """Everything the machine refuses that `cfg` needs, lasting problems first."""
    found = [*_state_dir(cfg.state_dir), *_readable_files(cfg.broker), *_broker_host(cfg.broker),
             *_local_dir(cfg.models.local_dir)]
    return sorted(found, key=lambda p: not p.lasting)


def _state_dir(state_dir: str) -> list[Problem]:
    path = Path(state_dir)
    if path.is_dir():
        return _probe(path, make_folder=False, what=f"{path} is not writable")
    # Not there yet: the agent creates it, so the nearest folder that exists must let it.
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return [Problem("state_dir", f"{path} cannot be created: {parent} is not a folder")]
    return _probe(parent, make_folder=True, what=f"{path} cannot be created in {parent}")


def _probe(folder: Path, *, make_folder: bool, what: str) -> list[Problem]:
    """Make and remove what the agent will make there: a file, or its state folder."""
    try:
        if make_folder:
            os.rmdir(tempfile.mkdtemp(prefix=_PROBE_PREFIX, dir=folder))
        else:
            fd, name = tempfile.mkstemp(prefix=_PROBE_PREFIX, dir=folder)
            os.close(fd)
            os.unlink(name)
    except OSError as exc:
        return [Problem("state_dir", f"{what} ({exc.strerror or exc})")]
    return []


def _readable_files(broker: BrokerConfig) -> list[Problem]:
    named = {"broker.tls.ca_file": broker.tls.ca_file, "broker.tls.cert_file": broker.tls.cert_file,
             "broker.tls.key_file": broker.tls.key_file, "broker.password_file": broker.password_file}
    problems = []
    for key, value in named.items():
        if value is None:
            continue
        try:
            # O_NONBLOCK: a FIFO named here must not hang the check.
            fd = os.open(value, os.O_RDONLY | os.O_NONBLOCK)
            try:
                os.read(fd, 1)
            finally:
                os.close(fd)
        except OSError as exc:
            problems.append(Problem(key, f"{value} cannot be read ({exc.strerror or exc})"))
    return problems


def _broker_host(broker: BrokerConfig) -> list[Problem]:
    addr = parse_broker_url(broker.url)
    try:
        socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        why = exc.strerror if isinstance(exc, socket.gaierror) else "not a valid host name"
        return [Problem("broker.url", f"host {addr.host!r} does not resolve ({why})",
                        lasting=False)]
    return []


def _local_dir(local_dir: str) -> list[Problem]:
    """models.local_dir: a folder missing yet may be made or mounted later (the agent looks
    again every scan), one that cannot be read stays so."""
    if not local_dir:
        return []
    path = Path(local_dir)
    if not path.is_dir():
        return [Problem("models.local_dir", f"{path} is not a folder (yet): nothing is served "
                        "from it until it is", lasting=False)]
    if not os.access(path, os.R_OK | os.X_OK):
        return [Problem("models.local_dir", f"{path} cannot be read")]
    return []
