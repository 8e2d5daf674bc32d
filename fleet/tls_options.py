"""`edge-fleet` options for a TLS broker: CA, client certificate, username, password file.

Every option has an environment variable, so an operator sets them once:

    EDGE_FLEET_BROKER=mqtts://broker.example:8883 EDGE_FLEET_CA_FILE=ca.pem \\
    EDGE_FLEET_CERT_FILE=fleet.pem EDGE_FLEET_KEY_FILE=fleet.key edge-fleet devices

The password is read from `--password-file`, else from `$CREDENTIALS_DIRECTORY/mqtt-password`
when that exists (a systemd service), never from the command line.
"""

from __future__ import annotations

import argparse
import os

from edgeinfer.contract.credentials import DEFAULT_CREDENTIAL, CredentialError, resolve_password
from edgeinfer.contract.transport import TransportError, TransportSecurity
from edgeinfer.fleet.mqtt import BrokerError, Connection

_OPTIONS = (
    # flag, env var, metavar, help
    ("--ca-file", "EDGE_FLEET_CA_FILE", "PEM",
     "CA bundle the broker's certificate must chain to (mqtts://; default: the system store)"),
    ("--cert-file", "EDGE_FLEET_CERT_FILE", "PEM", "client certificate for mutual TLS"),
    ("--key-file", "EDGE_FLEET_KEY_FILE", "PEM",
     "private key of --cert-file (unencrypted; default: inside --cert-file)"),
    ("--username", "EDGE_FLEET_USERNAME", "NAME", "MQTT username"),
    ("--password-file", "EDGE_FLEET_PASSWORD_FILE", "PATH",
     f"file holding the MQTT password (default: $CREDENTIALS_DIRECTORY/{DEFAULT_CREDENTIAL} "
     "if present)"),
)

_NAMES = {
    "ca_file": "--ca-file",
    "cert_file": "--cert-file",
    "key_file": "--key-file",
    "password_file": "--password-file",
    "password_credential": f"$CREDENTIALS_DIRECTORY/{DEFAULT_CREDENTIAL}",
}


def add_security_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("broker security (mqtts://, credentials)")
    for flag, env, metavar, text in _OPTIONS:
        group.add_argument(flag, metavar=metavar, default=os.environ.get(env) or None,
                           help=f"{text} (env {env})")


def security_from_args(args: argparse.Namespace) -> TransportSecurity:
    """The options as a TransportSecurity; a password source that fails is a BrokerError."""
    username = getattr(args, "username", None)
    password_file = getattr(args, "password_file", None)
    if password_file and not username:
        raise BrokerError("--password-file needs --username")
    password = None
    if username:
        try:
            password = resolve_password(password_file, DEFAULT_CREDENTIAL)
        except CredentialError as exc:
            raise BrokerError(f"broker password: {exc}") from None
    return TransportSecurity(
        ca_file=getattr(args, "ca_file", None),
        cert_file=getattr(args, "cert_file", None),
        key_file=getattr(args, "key_file", None),
        username=username or None,
        password=password,
        names=_NAMES,
    )


def check_broker(url: str, security: TransportSecurity) -> None:
    """BrokerError for what connecting would refuse before it tries: a malformed URL, TLS
    options on plain TCP, TLS files that do not load. Commands check this before they
    write anything, so a mistyped option leaves nothing behind."""
    try:
        Connection(url, security=security)  # a client set up as connect() would; no socket
    except (ValueError, TransportError) as exc:
        raise BrokerError(str(exc)) from None
