#!/usr/bin/env python3
"""Make the certificates of an edgeinfer fleet: a fleet CA, the broker's certificate,
client certificates (devices, the fleet identity, job clients) and a CRL.

Needs only the `cryptography` package (no openssl command). The CN of a client certificate
is the identity the broker's ACL sees (mosquitto `use_identity_as_username`): a device's
CN is its device id, the fleet tools' CN is `fleet`.

    python deploy/make_certs.py --dir pki ca
    python deploy/make_certs.py --dir pki broker --name broker.example --ip 10.0.0.2
    python deploy/make_certs.py --dir pki client fleet gw-0001 gw-0002 app-camera-7
    python deploy/make_certs.py --dir pki revoke gw-0002   # rewrites pki/crl.pem
    python deploy/make_certs.py --dir pki crl              # refresh crl.pem before it expires

Files in DIR: ca.pem ca.key, broker.pem broker.key, <cn>.pem <cn>.key, crl.pem. Keys are
written mode 0600 and never overwritten. Copy ca.pem, broker.pem, broker.key and crl.pem
to the broker; ca.pem, <device>.pem and <device>.key to each device. Keep ca.key offline.
After `revoke`, copy crl.pem to the broker and restart mosquitto (it reads the CRL at start).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CN_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # device ids, as the topic tree allows
_SKEW = dt.timedelta(minutes=5)  # tolerate clocks a little behind


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgeinfer"),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


def make_ca(cn: str = "edgeinfer fleet CA", days: int = 3650
            ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = new_key()
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=False, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          key_cert_sign=True, crl_sign=True, encipher_only=False,
                          decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    cn: str,
    *,
    server_names: Sequence[str] = (),
    server_ips: Sequence[str] = (),
    days: int = 825,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A leaf certificate: a server one when names or IPs are given, else a client one."""
    key = new_key()
    now = _now()
    server = bool(server_names or server_ips)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          key_cert_sign=False, crl_sign=False, encipher_only=False,
                          decipher_only=False),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                   else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_aki(ca_cert), critical=False)
    )
    if server:
        alt: list[x509.GeneralName] = [x509.DNSName(n) for n in server_names]
        alt += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in server_ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def make_crl(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    revoked_serials: Iterable[int],
    *,
    number: int = 1,
    days: int = 30,
) -> x509.CertificateRevocationList:
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - _SKEW)
        .next_update(now + dt.timedelta(days=days))
        .add_extension(_aki(ca_cert), critical=False)
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for serial in sorted(set(revoked_serials)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now - _SKEW)
            .build()
        )
    return builder.sign(ca_key, hashes.SHA256())


def _aki(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


# -- files -----------------------------------------------------------------------------


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_pair(directory: Path, stem: str, key: ec.EllipticCurvePrivateKey,
               cert: x509.Certificate) -> tuple[Path, Path]:
    """Write <stem>.key (0600, never overwritten) and <stem>.pem."""
    key_path, cert_path = directory / f"{stem}.key", directory / f"{stem}.pem"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem(key))
    cert_path.write_bytes(cert_pem(cert))
    return cert_path, key_path


def load_ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SystemExit(f"{directory / 'ca.key'}: not an EC key made by this script")
    return key, x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())


def write_crl(directory: Path, add: Iterable[int] = (), days: int = 30) -> Path:
    """crl.pem with every serial revoked so far plus `add`, numbered one higher."""
    ca_key, ca_cert = load_ca(directory)
    path = directory / "crl.pem"
    serials, number = set(add), 1
    if path.exists():
        old = x509.load_pem_x509_crl(path.read_bytes())
        serials |= {r.serial_number for r in old}
        number = old.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
    crl = make_crl(ca_key, ca_cert, serials, number=number, days=days)
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("pki"), help="where the files live")
    parser.add_argument("--days", type=int, default=None, help="validity in days")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ca", help="make the fleet CA (ca.pem, ca.key) and an empty CRL")
    p = sub.add_parser("broker", help="make the broker's server certificate")
    p.add_argument("--name", action="append", default=[], help="DNS name (repeatable)")
    p.add_argument("--ip", action="append", default=[], help="IP address (repeatable)")
    p = sub.add_parser("client", help="make client certificates; the CN is the identity")
    p.add_argument("cn", nargs="+", help="device id, `fleet`, or a job client's name")
    p = sub.add_parser("revoke", help="add certificates to crl.pem")
    p.add_argument("cn", nargs="+")
    sub.add_parser("crl", help="re-sign crl.pem (valid --days, default 30: refresh it in time, "
                   "an expired CRL makes the broker refuse every client)")
    args = parser.parse_args(argv)
    d: Path = args.dir
    d.mkdir(parents=True, exist_ok=True)
    try:
        if args.command == "ca":
            key, cert = make_ca(days=args.days or 3650)
            write_pair(d, "ca", key, cert)
            print(f"wrote {write_crl(d)} and {d / 'ca.pem'}")
            return 0
        ca_key, ca_cert = load_ca(d)
        if args.command == "broker":
            if not args.name and not args.ip:
                parser.error("broker needs --name or --ip (the names clients dial)")
            key, cert = issue(ca_key, ca_cert, (args.name or args.ip)[0], server_names=args.name,
                              server_ips=args.ip, days=args.days or 825)
            print("wrote", *write_pair(d, "broker", key, cert))
        elif args.command == "client":
            for cn in args.cn:
                if not CN_RE.match(cn) or cn in {"ca", "broker", "crl"}:
                    parser.error(f"{cn!r}: a CN must match [A-Za-z0-9_-]{{1,64}}, not ca/broker/crl")
                key, cert = issue(ca_key, ca_cert, cn, days=args.days or 825)
                print("wrote", *write_pair(d, cn, key, cert))
        elif args.command == "revoke":
            serials = [x509.load_pem_x509_certificate((d / f"{cn}.pem").read_bytes()).serial_number
                       for cn in args.cn]
            print(f"wrote {write_crl(d, serials, args.days or 30)}: revoked {', '.join(args.cn)}")
        else:
            print(f"wrote {write_crl(d, days=args.days or 30)}")
    except FileExistsError as exc:
        print(f"make_certs: {exc.filename} exists; not overwriting a key", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"make_certs: {exc.filename}: no such file (run `ca` first?)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
