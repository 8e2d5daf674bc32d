"""The agent's transport security, from `broker.*` of its config (contract/transport.py)."""

from __future__ import annotations

from collections.abc import Mapping

from edgeinfer.agent.config import BrokerConfig
from edgeinfer.contract.credentials import CredentialError, Secret, resolve_password
from edgeinfer.contract.transport import TransportError, TransportSecurity

CONFIG_NAMES: Mapping[str, str] = {
    "ca_file": "broker.tls.ca_file",
    "cert_file": "broker.tls.cert_file",
    "key_file": "broker.tls.key_file",
    "server_name": "broker.tls.server_name",
    "password_file": "broker.password_file",
    "password_credential": "$CREDENTIALS_DIRECTORY/<broker.password_credential>",
}


def security_from_config(
    cfg: BrokerConfig, environ: Mapping[str, str] | None = None
) -> TransportSecurity:
    """The agent's transport security; reads the password (raises TransportError)."""
    password: Secret | None = None
    if cfg.username is not None:
        try:
            password = resolve_password(cfg.password_file, cfg.password_credential, environ)
        except CredentialError as exc:
            raise TransportError(f"broker password: {exc}") from None
    names = dict(CONFIG_NAMES)
    names["password_credential"] = f"$CREDENTIALS_DIRECTORY/{cfg.password_credential}"
    return TransportSecurity(
        ca_file=cfg.tls.ca_file,
        cert_file=cfg.tls.cert_file,
        key_file=cfg.tls.key_file,
        server_name=cfg.tls.server_name,
        username=cfg.username,
        password=password,
        names=names,
    )
