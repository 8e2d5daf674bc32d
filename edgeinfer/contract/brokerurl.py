"""`mqtt://host:port` and `mqtts://host:port` broker addresses."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_BROKER_URL = "mqtt://127.0.0.1:1883"
_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """Raises ValueError naming what is wrong with the URL."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        # Never echo such a URL: it may hold a password.
        raise ValueError(
            "broker URL must not carry a user name or password; give the user name and a "
            "password file separately"
        )
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"broker URL {url!r} must start with mqtt:// or mqtts://")
    if not parts.hostname:
        raise ValueError(f"broker URL {url!r} names no host")
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError:
        raise ValueError(f"broker URL {url!r} has an invalid port") from None
    if parts.path not in ("", "/"):
        raise ValueError(f"broker URL {url!r} must not have a path")
    return BrokerAddress(host=parts.hostname, port=port, tls=scheme == "mqtts")
