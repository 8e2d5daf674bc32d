"""Broker passwords: read from a file or a systemd credential, never from the config, never logged.

systemd's `LoadCredential=mqtt-password:/etc/edge-agent/mqtt-password` hands the service a
private copy under `$CREDENTIALS_DIRECTORY/mqtt-password`; `broker.password_file` names a
file directly. The config itself never holds a password (`agent.config` refuses one).
A password lives in a `Secret`, whose repr and str name only where it came from.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"
DEFAULT_CREDENTIAL = "mqtt-password"
_MAX_PASSWORD_BYTES = 65535  # an MQTT binary field's limit


class CredentialError(Exception):
    """A password source is named but cannot be used; the message never holds the password."""


class Secret:
    """A password that does not print itself: `reveal()` is the only way to the value."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str) -> None:
        self._value = value
        self.source = source

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret(from {self.source})"

    __str__ = __repr__


def read_secret_file(path: Path, source: str) -> Secret:
    """The first line of `path` (without its line end) as a Secret; raises CredentialError."""
    try:
        st = path.stat()
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CredentialError(f"{source}: no such file") from None
    except OSError as exc:
        raise CredentialError(f"{source}: cannot read: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CredentialError(f"{source}: not a regular file")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is readable by group or others (mode %o): chmod 600 it",
                    source, stat.S_IMODE(st.st_mode))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CredentialError(f"{source}: not UTF-8 text") from None
    value = text.splitlines()[0] if text else ""
    if not value:
        raise CredentialError(f"{source}: empty")
    if len(value.encode("utf-8")) > _MAX_PASSWORD_BYTES:
        raise CredentialError(f"{source}: longer than MQTT allows ({_MAX_PASSWORD_BYTES} bytes)")
    return Secret(value, source)


def resolve_password(
    password_file: str | None,
    credential: str = DEFAULT_CREDENTIAL,
    environ: Mapping[str, str] | None = None,
) -> Secret | None:
    """The broker password: `password_file` if named, else `$CREDENTIALS_DIRECTORY/<credential>`
    if that exists, else None. A named file that cannot be read is a CredentialError."""
    if password_file:
        return read_secret_file(Path(password_file), f"password file {password_file}")
    environ = os.environ if environ is None else environ
    directory = environ.get(CREDENTIALS_ENV)
    if not directory:
        return None
    path = Path(directory) / credential
    if not path.exists():
        return None
    return read_secret_file(path, f"${CREDENTIALS_ENV}/{credential}")
