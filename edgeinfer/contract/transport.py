"""Transport security for every MQTT client of the project: TLS, client certificates, password.

`TransportSecurity` says how to reach a broker safely and applies that to a paho client
(`apply`, the fleet tools) or hands a socket of our own its context and credentials
(`for_socket`, the agent's session).
The agent builds one from `broker.*` of its config (agent/tls.py), the fleet
tools from their command-line options. The same object serves `edge-agent doctor`, so the
check goes through exactly what the daemon uses.

- `mqtts://` always verifies the broker: its certificate must chain to `ca_file` (default:
  the system CA store) and carry the host name of the URL (or `server_name`). There is
  no switch to turn verification off.
- TLS options with a plain `mqtt://` URL are an error, never ignored.
- The password travels only inside `Secret`, the paho client and `SocketParams`;
  `describe()` names where it came from, never what it is.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edgeinfer.configfile import ConfigError
from edgeinfer.contract.brokerurl import BrokerAddress
from edgeinfer.contract.credentials import Secret

if TYPE_CHECKING:  # the agent's own session needs no paho; the fleet tools' clients do
    import paho.mqtt.client as mqtt


class TransportError(ConfigError):
    """Certificates, keys or credentials that cannot be used (a config problem: exit 2)."""


class _NamedContext(ssl.SSLContext):
    """A client context that checks the broker's certificate for `expected_name`
    instead of the host that was dialled (e.g. a broker reached by IP address)."""

    expected_name: str = ""

    def wrap_socket(
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        return super().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=do_handshake_on_connect,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=self.expected_name or server_hostname,
            session=session,
        )


@dataclass(frozen=True)
class SocketParams:
    """TLS context and credentials for a socket of our own (never printed: repr hides them)."""

    context: ssl.SSLContext | None = field(repr=False)
    username: str | None
    password: bytes | None = field(repr=False)


@dataclass(frozen=True)
class TransportSecurity:
    """How to reach one broker: TLS files, expected name, username and password."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None
    username: str | None = None
    password: Secret | None = field(default=None, repr=False)
    # Words for messages: how the caller names these options (config keys or CLI flags).
    names: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def _name(self, key: str) -> str:
        return self.names.get(key, key)

    @property
    def tls_options(self) -> tuple[str, ...]:
        return tuple(k for k in ("ca_file", "cert_file", "key_file", "server_name")
                     if getattr(self, k))

    def ssl_context(self) -> ssl.SSLContext:
        """A verifying client context: CERT_REQUIRED, host name checked, TLS 1.2 or newer."""
        ctx = _NamedContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED on
        ctx.expected_name = self.server_name or ""
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            if self.ca_file:
                ctx.load_verify_locations(cafile=self.ca_file)
            else:
                ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        except (OSError, ssl.SSLError) as exc:
            raise TransportError(
                f"{self._name('ca_file')}: cannot load CA certificates from {self.ca_file}: "
                f"{_reason(exc)}"
            ) from None
        if self.cert_file:
            try:
                ctx.load_cert_chain(self.cert_file, self.key_file or None, password=_no_passphrase)
            except (OSError, ssl.SSLError, TypeError) as exc:
                key = f" with key {self.key_file}" if self.key_file else ""
                raise TransportError(
                    f"{self._name('cert_file')}: cannot load client certificate "
                    f"{self.cert_file}{key}: {_reason(exc)} (an unencrypted PEM key that "
                    "matches the certificate is needed)"
                ) from None
        return ctx

    def _check(self, addr: BrokerAddress) -> None:
        if not addr.tls and self.tls_options:
            names = ", ".join(self._name(k) for k in self.tls_options)
            raise TransportError(
                f"{names} given but the broker URL is {addr} (plain TCP); use mqtts:// "
                "(TLS options are never ignored silently)"
            )
        if self.key_file and not self.cert_file:
            raise TransportError(f"{self._name('key_file')} needs {self._name('cert_file')}")

    def apply(self, client: mqtt.Client, addr: BrokerAddress) -> None:
        """Configure a paho `client` for `addr`; raises TransportError on unusable options."""
        self._check(addr)
        if addr.tls:
            client.tls_set_context(self.ssl_context())
        if self.username is not None:
            client.username_pw_set(
                self.username, self.password.reveal() if self.password is not None else None
            )

    def for_socket(self, addr: BrokerAddress) -> SocketParams:
        """What a client that opens its own socket needs for `addr` (the agent's session,
        agent/mqtt_session/): the verifying SSL context (None for mqtt://), the user name
        and the password bytes for CONNECT. Raises TransportError on unusable options."""
        self._check(addr)
        password = self.password.reveal().encode() if self.password is not None else None
        return SocketParams(self.ssl_context() if addr.tls else None, self.username, password)

    def describe(self, addr: BrokerAddress) -> str:
        """One line for logs and `doctor`: what is used, never a secret."""
        parts: list[str] = []
        if addr.tls:
            ca = self.ca_file or "the system CA store"
            parts.append(f"TLS, broker certificate checked against {ca} for name "
                         f"{self.server_name or addr.host}")
            if self.cert_file:
                parts.append(f"client certificate {self.cert_file}")
        else:
            parts.append("plain TCP (no TLS)")
        if self.username is not None:
            how = f"password from {self.password.source}" if self.password else "no password"
            parts.append(f"user {self.username} with {how}")
        return ", ".join(parts)

    def warnings(self, addr: BrokerAddress) -> list[str]:
        """What an operator should fix although the connection may work."""
        out: list[str] = []
        if not addr.tls and self.password is not None and not _is_loopback(addr.host):
            out.append(f"the broker password travels in clear text to {addr}: use mqtts://")
        if self.username is not None and self.password is None and not self.cert_file:
            out.append(f"user {self.username} has no password (set {self._name('password_file')} "
                       f"or provide the credential {self._name('password_credential')})")
        return out


def describe_connect_error(exc: BaseException) -> str:
    """Why a connection attempt failed, in words that point at the fix."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"TLS: the broker's certificate is not trusted: {exc.verify_message} "
                "(check the CA file and the broker's name)")
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {_reason(exc)}"
    return str(exc) or type(exc).__name__


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).replace("_", " ").lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def _no_passphrase() -> str:
    # Called only for an encrypted key: fail instead of prompting on a terminal.
    raise TypeError("the private key is encrypted")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
