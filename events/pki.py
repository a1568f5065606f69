"""The device certificate authority: a local CA that signs the gateway's server certificate and
one client certificate per device (`labbus devices init-ca`, `labbus devices issue-cert ID`).

Files, under LABBUS_PKI_DIR (default `LABBUS_HOME/pki/`; keys mode 0600):

    ca.pem, ca.key                  the CA (EC P-256, 10 years)
    gateway.pem, gateway.key        the gateway's server certificate (SAN: localhost, 127.0.0.1
                                    and any --host given to init-ca)
    devices/ID.pem, devices/ID.key  a client certificate: subject CN = ID, OU = its role
    sila/NAME.pem, sila/NAME.key    a SiLA 2 server's certificate (the simulator's; SAN as the
                                    gateway's, plus the server UUID extension SiLA 2 asks for)

The local Kafka broker's certificate (`labbus services up`, server and client use, SAN as the
gateway's) is signed by the same CA and kept with a copy of ca.pem in LABBUS_HOME/kafka/security.

The device id is the certificate's subject CN. Its OU is its role: `device` (may register,
stream and answer commands, as itself only) or `operator` (may send commands and query).

The CA lives in the kernel (labbus.events) because deploy (the broker's certificate, the clients'
trust) and producers (the gateway, devices, SiLA 2 servers) both use it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROLES = ("device", "operator")
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class PkiError(RuntimeError):
    """A missing CA, a bad id: the message says what to run."""


@dataclass(frozen=True)
class Paths:
    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "gateway.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "gateway.key"

    def client_cert(self, name: str) -> Path:
        return self.root / "devices" / f"{name}.pem"

    def client_key(self, name: str) -> Path:
        return self.root / "devices" / f"{name}.key"


def paths(root: Path) -> Paths:
    """The PKI in a directory (Config.pki_dir)."""
    return Paths(Path(root))


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())  # fast handshakes for a thousand devices


def _write_key(path: Path, key) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(cn: str, ou: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "labbus")]
    if ou:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def _load_ca(p: Paths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if not p.ca_cert.exists() or not p.ca_key.exists():
        raise PkiError(f"no device CA in {p.root}; create it with `labbus devices init-ca`")
    cert = x509.load_pem_x509_certificate(p.ca_cert.read_bytes())
    key = serialization.load_pem_private_key(p.ca_key.read_bytes(), password=None)
    return cert, key


def _sign(ca_cert, ca_key, subject: x509.Name, public_key, days: int, usage,
          sans: list[x509.GeneralName] | None = None,
          extra: tuple[x509.ExtensionType, ...] = ()) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(subject).issuer_name(ca_cert.subject).public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(
                   list(usage) if isinstance(usage, (list, tuple)) else [usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca_key.public_key()), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    for ext in extra:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def init_ca(root: Path, hosts: tuple[str, ...] = (), force: bool = False) -> Paths:
    """Create the CA and the gateway's server certificate; an existing CA is kept unless
    `force` (which invalidates every certificate it signed)."""
    p = paths(root)
    if force or not (p.ca_cert.exists() and p.ca_key.exists()):
        key = _key()
        now = dt.datetime.now(dt.UTC)
        subject = _name("labbus device CA")
        cert = (x509.CertificateBuilder()
                .subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=3650))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        _write_key(p.ca_key, key)
        _write_cert(p.ca_cert, cert)
        force = True  # the server certificate must come from this CA
    if force or not p.server_cert.exists() or hosts:
        issue_server_cert(root, hosts)
    return p


def _sans(hosts: tuple[str, ...]) -> list[x509.GeneralName]:
    sans: list[x509.GeneralName] = []
    for host in ("localhost", "127.0.0.1", "::1", *hosts):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    return sans


def issue_server_cert(root: Path, hosts: tuple[str, ...] = ()) -> Paths:
    p = paths(root)
    ca_cert, ca_key = _load_ca(p)
    key = _key()
    cert = _sign(ca_cert, ca_key, _name("labbus-gateway", "gateway"), key.public_key(), 825,
                 ExtendedKeyUsageOID.SERVER_AUTH, _sans(hosts))
    _write_key(p.server_key, key)
    _write_cert(p.server_cert, cert)
    return p


KAFKA_BROKER_CN = "labbus-kafka"  # the broker's principal on its mutual-TLS controller listener


def issue_kafka_cert(root: Path, dest: Path, hosts: tuple[str, ...] = (),
                     days: int = 825) -> tuple[Path, Path]:
    """The local Kafka broker's certificate from the CA in `root`, written to `dest` with a
    copy of the CA (so the broker and its clients keep working if LABBUS_PKI_DIR later points
    elsewhere); returns (keystore PEM: key then certificate, CA PEM). Used for TLS on the
    broker's client listener and, as server and client certificate, on its controller
    listener."""
    p = paths(root)
    ca_cert, ca_key = _load_ca(p)
    key = _key()
    cert = _sign(ca_cert, ca_key, _name(KAFKA_BROKER_CN, "kafka-broker"), key.public_key(), days,
                 [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], _sans(hosts))
    keystore, ca_copy = dest / "broker-keystore.pem", dest / "ca.pem"
    _write_key(keystore, key)
    with open(keystore, "ab") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    _write_cert(ca_copy, ca_cert)
    return keystore, ca_copy


SILA_SERVER_UUID_OID = x509.ObjectIdentifier("1.3.6.1.4.1.58583")  # SiLA 2 part B, 8.2.3


def issue_sila_server_cert(root: Path, name: str, server_uuid: str,
                           hosts: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """A SiLA 2 server's certificate from the CA (issued again each time: it is cheap, and the
    hosts may differ); returns (cert, key). It carries the server's UUID in the extension SiLA 2
    clients check against the server's SiLAService/ServerUUID."""
    if not ID_PATTERN.match(name):
        raise PkiError(f"{name!r} is not a valid name: 1-128 letters, digits, '.', '_' or '-'")
    p = paths(root)
    ca_cert, ca_key = _load_ca(p)
    key = _key()
    cert = _sign(ca_cert, ca_key, _name(name, "sila-server"), key.public_key(), 825,
                 ExtendedKeyUsageOID.SERVER_AUTH, _sans(hosts),
                 (x509.UnrecognizedExtension(SILA_SERVER_UUID_OID, server_uuid.encode()),))
    cert_path, key_path = p.root / "sila" / f"{name}.pem", p.root / "sila" / f"{name}.key"
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path, key_path


def issue_cert(root: Path, name: str, role: str = "device", days: int = 825,
               force: bool = False) -> tuple[Path, Path]:
    """A client certificate with subject CN = `name`; returns (cert, key). An existing one is
    kept unless `force`."""
    if not ID_PATTERN.match(name):
        raise PkiError(f"{name!r} is not a valid id: 1-128 letters, digits, '.', '_' or '-', "
                       "starting with a letter or digit")
    if role not in ROLES:
        raise PkiError(f"role {role!r}: use one of {', '.join(ROLES)}")
    p = paths(root)
    cert_path, key_path = p.client_cert(name), p.client_key(name)
    if not force and cert_path.exists() and key_path.exists():
        return cert_path, key_path
    ca_cert, ca_key = _load_ca(p)
    key = _key()
    cert = _sign(ca_cert, ca_key, _name(name, role), key.public_key(), days,
                 ExtendedKeyUsageOID.CLIENT_AUTH)
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path, key_path


@dataclass(frozen=True)
class Identity:
    name: str  # the subject CN: the device id
    role: str  # the subject OU


@lru_cache(maxsize=4096)
def identity_of_pem(pem: bytes) -> Identity:
    """The identity a (verified) client certificate states."""
    cert = x509.load_pem_x509_certificate(pem)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return Identity(str(cns[0].value) if cns else "", str(ous[0].value) if ous else "")
