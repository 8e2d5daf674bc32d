"""Transport settings in the agent's config: secrets never inline (not in the file, the
environment or the URL) and never echoed, TLS settings never ignored, every error naming its
key; where a password comes from; the clear-text warning. In-process, no broker.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeinfer.agent.config import ConfigError, load_config
from edgeinfer.agent.tls import security_from_config
from edgeinfer.contract.brokerurl import parse_broker_url
from edgeinfer.contract.credentials import Secret, resolve_password
from edgeinfer.contract.transport import TransportError, TransportSecurity
from tests.pki import Pki


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.yaml"
    p.write_text(text)
    return p


def test_inline_password_is_refused_without_echo(tmp_path: Path) -> None:
    p = _write(tmp_path, "broker:\n  username: gw-1\n  password: hunter2-inline\n")
    with pytest.raises(ConfigError, match=r"broker\.password") as info:
        load_config(p, {})
    assert "hunter2-inline" not in str(info.value)
    assert "password_file" in str(info.value)
    with pytest.raises(ConfigError, match=r"broker\.password") as info:
        load_config(None, {"EDGE_AGENT_BROKER__PASSWORD": "hunter2-env"})
    assert "hunter2-env" not in str(info.value)


def test_password_in_url_is_refused_without_echo(tmp_path: Path) -> None:
    p = _write(tmp_path, "broker:\n  url: mqtts://gw:hunter2-url@broker.example:8883\n")
    with pytest.raises(ConfigError, match=r"broker\.url") as info:
        load_config(p, {})
    assert "hunter2-url" not in str(info.value)
    with pytest.raises(ValueError, match="user name or password"):
        parse_broker_url("mqtt://u:p@host")


@pytest.mark.parametrize(
    ("text", "key", "what"),
    [
        ("broker:\n  url: mqtt://h:1883\n  tls:\n    ca_file: {ca}\n", "broker.tls", "use mqtts://"),
        ("broker:\n  url: mqtts://h\n  tls:\n    ca_file: /nonexistent/ca.pem\n",
         "broker.tls.ca_file", "no such file"),
        ("broker:\n  url: mqtts://h\n  tls:\n    key_file: {ca}\n", "broker.tls.key_file",
         "needs broker.tls.cert_file"),
        ("broker:\n  password_file: {ca}\n", "broker.password_file", "needs broker.username"),
        ("broker:\n  username: u\n  password_credential: ../x\n", "broker.password_credential",
         "plain file name"),
        ("broker:\n  tls:\n    verify: false\n", "broker.tls.verify", "unknown key"),
    ],
)
def test_transport_config_errors_name_the_key(
    tmp_path: Path, pki: Pki, text: str, key: str, what: str
) -> None:
    p = _write(tmp_path, text.replace("{ca}", pki.path("ca.pem")))
    with pytest.raises(ConfigError) as info:
        load_config(p, {})
    assert f"'{key}'" in str(info.value) and what in str(info.value), str(info.value)


def test_password_sources(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("from-credential\n")
    (creds / "other").write_text("other-credential")
    pw_file = tmp_path / "pw"
    pw_file.write_text("from-file\r\n")
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    cfg = load_config(_write(tmp_path, "broker:\n  username: u\n"), env)
    sec = security_from_config(cfg.broker, env)
    assert sec.password is not None and sec.password.reveal() == "from-credential"
    cfg = load_config(_write(tmp_path, "broker:\n  username: u\n  password_credential: other\n"),
                      env)
    assert security_from_config(cfg.broker, env).password.reveal() == "other-credential"  # type: ignore[union-attr]
    cfg = load_config(_write(tmp_path, f"broker:\n  username: u\n  password_file: {pw_file}\n"),
                      env)
    sec = security_from_config(cfg.broker, env)
    assert sec.password is not None and sec.password.reveal() == "from-file"
    # Nothing of the secret in repr/str/describe.
    addr = parse_broker_url("mqtts://broker.example")
    for text in (repr(sec), str(sec.password), sec.describe(addr), repr(cfg)):
        assert "from-file" not in text
    assert security_from_config(load_config(None, {}).broker, env).password is None
    # No username: the credential is not even read.
    assert isinstance(resolve_password(None, environ=env), Secret)
    pw_file.write_text("")
    cfg = load_config(_write(tmp_path, f"broker:\n  username: u\n  password_file: {pw_file}\n"), {})
    with pytest.raises(TransportError, match="empty"):
        security_from_config(cfg.broker, {})


def test_plain_password_to_remote_broker_warns() -> None:
    sec = TransportSecurity(username="u", password=Secret("x", "test"))
    assert any("clear text" in w for w in sec.warnings(parse_broker_url("mqtt://10.1.2.3")))
    assert not sec.warnings(parse_broker_url("mqtt://127.0.0.1"))
    assert not sec.warnings(parse_broker_url("mqtts://10.1.2.3"))
