"""Kafka consumer and dead-letter producer, configured from the policy file.

kafka-python is used directly; this module only builds the clients with the
settings at-least-once delivery needs (no auto-commit, bounded fetches) and
writes dead-letter records in one documented shape.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.net.sasl.oauth import AbstractTokenProvider
from pydantic import SecretStr

from policies.config import IngestPolicy

__all__ = [
    "KafkaConsumer",
    "KafkaProducer",
    "TopicPartition",
    "ConsumerRebalanceListener",
    "KafkaConnection",
    "FileTokenProvider",
    "kafka_client_config",
    "diagnose",
    "make_consumer",
    "make_dead_letter_producer",
    "dead_letter_headers",
    "dead_letter_value",
    "stuck_partition",
    "consumer_lag",
    "broker_connected",
    "DEAD_LETTER_HEADROOM",
]

# Bytes a dead-letter record may take beyond its value: the cptd-* headers (the detail is cut at 1000 bytes) and
# the record batch framing. The dead-letter topic must accept ingest.max_message_bytes plus this (docs/ingest.md).
DEAD_LETTER_HEADROOM = 16 * 1024


SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER")


@dataclass(frozen=True)
class KafkaConnection:
    """How to reach the brokers: where, which security protocol, the TLS files and the SASL credentials.

    Secrets are SecretStr (masked in reprs and logs) or files read when a client is built, so a rotated
    mounted Secret is picked up by the next client. `describe()` is the safe name used in every message.
    """

    bootstrap: str
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    sasl_password_file: Path | None = None
    sasl_oauth_token_file: Path | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_key_password: SecretStr | None = None
    ssl_check_hostname: bool = True

    def __post_init__(self) -> None:
        if self.security_protocol not in SECURITY_PROTOCOLS:
            raise ValueError(f"kafka security protocol {self.security_protocol!r}: expected one of {', '.join(SECURITY_PROTOCOLS)}")
        if self.sasl:
            if self.sasl_mechanism not in SASL_MECHANISMS:
                raise ValueError(f"kafka {self.security_protocol} needs a SASL mechanism, one of {', '.join(SASL_MECHANISMS)}")
            if self.sasl_mechanism == "OAUTHBEARER":
                if self.sasl_oauth_token_file is None:
                    raise ValueError("kafka SASL OAUTHBEARER needs a token file (CPTD_KAFKA_SASL_OAUTH_TOKEN_FILE)")
            elif not self.sasl_username or (self.sasl_password is None and self.sasl_password_file is None):
                raise ValueError(f"kafka SASL {self.sasl_mechanism} needs a username and a password (or a password file)")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("kafka mTLS needs both a client certificate and its key")

    @property
    def tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    def describe(self) -> str:
        """Safe to log: the protocol, the mechanism and the brokers, never a credential."""
        mech = f"/{self.sasl_mechanism}" if self.sasl else ""
        return f"{self.security_protocol}{mech} {self.bootstrap}"

    def password(self) -> str:
        if self.sasl_password_file is not None:
            return self.sasl_password_file.read_text().strip()
        return self.sasl_password.get_secret_value() if self.sasl_password else ""


class FileTokenProvider(AbstractTokenProvider):
    """SASL/OAUTHBEARER token read from a mounted file, re-read whenever the file changes (a projected token rotates)."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self._token = ""

    def token(self) -> str:
        stat = os.stat(self.path)  # follows the ..data symlink Kubernetes swaps on update
        stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            self._token, self._stamp = self.path.read_text().strip(), stamp
        return self._token

    def __repr__(self) -> str:
        return f"FileTokenProvider({str(self.path)!r})"


def kafka_client_config(conn: KafkaConnection | str) -> dict[str, Any]:
    """The connection keyword arguments of every KafkaConsumer, KafkaProducer and KafkaAdminClient cptd builds."""
    if isinstance(conn, str):
        conn = KafkaConnection(bootstrap=conn)
    cfg: dict[str, Any] = {"bootstrap_servers": conn.bootstrap, "security_protocol": conn.security_protocol}
    if conn.tls:
        cfg["ssl_check_hostname"] = conn.ssl_check_hostname
        if conn.ssl_cafile is not None:
            cfg["ssl_cafile"] = str(conn.ssl_cafile)
        if conn.ssl_certfile is not None:
            cfg["ssl_certfile"] = str(conn.ssl_certfile)
            cfg["ssl_keyfile"] = str(conn.ssl_keyfile)
            if conn.ssl_key_password is not None:
                cfg["ssl_password"] = conn.ssl_key_password.get_secret_value()
    if conn.sasl:
        cfg["sasl_mechanism"] = conn.sasl_mechanism
        if conn.sasl_mechanism == "OAUTHBEARER":
            assert conn.sasl_oauth_token_file is not None
            cfg["sasl_oauth_token_provider"] = FileTokenProvider(conn.sasl_oauth_token_file)
        else:
            cfg["sasl_plain_username"] = conn.sasl_username
            cfg["sasl_plain_password"] = conn.password()
    return cfg


def _ssl_context(conn: KafkaConnection) -> ssl.SSLContext:
    """The context kafka-python builds from the same settings (kafka.net.transport), for the diagnosis below."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = conn.ssl_check_hostname
    if conn.ssl_cafile is not None:
        ctx.load_verify_locations(str(conn.ssl_cafile))
    else:
        ctx.load_default_certs()
    if conn.ssl_certfile is not None:
        pw = conn.ssl_key_password.get_secret_value() if conn.ssl_key_password else None
        ctx.load_cert_chain(str(conn.ssl_certfile), str(conn.ssl_keyfile), password=pw)
    return ctx


def diagnose(conn: KafkaConnection, timeout: float = 5.0) -> str:
    """Why the first bootstrap broker cannot be used, in words ("" when TCP and TLS succeed).

    kafka-python reports a failed bootstrap without the cause; this repeats the TCP connect and the TLS
    handshake with the same CA, client certificate and hostname check, so readiness and the log can say
    "TLS certificate verify failed: certificate has expired". SASL is not repeated here: a TLS handshake that
    succeeds on a broker the client cannot use points at the credentials or the ACLs.
    """
    first = conn.bootstrap.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    host = host.strip("[]") or first
    try:
        with socket.create_connection((host, int(port or 9092)), timeout=timeout) as sock:
            if not conn.tls:
                return ""
            try:
                ctx = _ssl_context(conn)
            except (OSError, ssl.SSLError) as e:
                return f"TLS client setup failed: {e}"
            with ctx.wrap_socket(sock, server_hostname=host) as tls:
                tls.do_handshake()
            return ""
    except ssl.SSLCertVerificationError as e:
        return f"TLS certificate verify failed: {e.verify_message}"
    except ssl.SSLError as e:
        return f"TLS handshake failed: {e.reason or e}"
    except OSError as e:
        return f"cannot connect to {first}: {e.strerror or e}"


def _closing_on_failure(cls: type, **kw: Any) -> Any:
    """`cls(**kw)`, closing the network client it made when the constructor raises.

    kafka-python 3.0 starts its IO thread before the eager bootstrap, and a constructor that fails (broker
    unreachable, authentication refused) leaves that thread running: one leaked thread per retry. The
    `kafka_client` factory hook lets us close what was built.
    """
    made: list[Any] = []
    default = cls.DEFAULT_CONFIG["kafka_client"]  # type: ignore[attr-defined]

    def factory(**cfg: Any) -> Any:
        made.append(default(**cfg))
        return made[-1]

    try:
        return cls(**kw, kafka_client=factory)
    except BaseException:
        for client in made:
            try:
                client.close()
            except Exception:  # noqa: BLE001, S110 - best effort: the constructor's error is the one to report
                pass
        raise


def make_consumer(bootstrap: KafkaConnection | str, ingest: IngestPolicy, client_id: str = "cptd-ingest") -> KafkaConsumer:
    """A group consumer that never commits on its own: offsets move only after Redis has the batch."""
    return _closing_on_failure(
        KafkaConsumer,
        **kafka_client_config(bootstrap),
        group_id=ingest.group_id,
        client_id=client_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=ingest.batch_max_docs,
        # Bounded memory: at most this much fetched but not yet processed.
        fetch_max_bytes=ingest.fetch_max_bytes,
        max_partition_fetch_bytes=max(ingest.max_message_bytes + 1024, 1_048_576),
        session_timeout_ms=ingest.session_timeout_ms,
        heartbeat_interval_ms=ingest.heartbeat_interval_ms,
        max_poll_interval_ms=ingest.max_poll_interval_ms,
    )


def make_dead_letter_producer(
    bootstrap: KafkaConnection | str, max_message_bytes: int, client_id: str = "cptd-dead-letter"
) -> KafkaProducer:
    """acks=all and retries: a dead letter must be durable before its offset is committed.

    Sized for what ingest admits: a dead-letter value is at most `max_message_bytes` (larger originals are
    cut by `dead_letter_value`), so one record plus headers always fits `max_request_size`, and the
    producer holds a few of them.
    """
    record_max = max_message_bytes + DEAD_LETTER_HEADROOM
    return _closing_on_failure(
        KafkaProducer,
        **kafka_client_config(bootstrap),
        client_id=client_id,
        acks="all",
        retries=5,
        max_request_size=record_max,
        batch_size=min(record_max, 1_048_576),
        linger_ms=5,
    )


def dead_letter_value(value: bytes | None, limit: int) -> tuple[bytes | None, list[tuple[str, bytes]]]:
    """The record value to dead-letter for an original of any size, and the headers that say if it was cut.

    An original over `limit` (ingest.max_message_bytes: what the dead-letter producer and topic are sized
    for) travels as its first `limit` bytes, with `cptd-truncated: 1`, `cptd-original-bytes` and
    `cptd-original-sha256`, so the operator can still identify the producer's message.
    """
    if value is None or len(value) <= limit:
        return value, []
    return value[:limit], [
        ("cptd-truncated", b"1"),
        ("cptd-original-bytes", str(len(value)).encode()),
        ("cptd-original-sha256", hashlib.sha256(value).hexdigest().encode()),
    ]


def dead_letter_headers(
    outcome: str, reason: str, detail: str, topic: str, partition: int, offset: int, extra: Iterable[tuple[str, bytes]] = ()
) -> list[tuple[str, bytes]]:
    """The original bytes travel as the record value (cut only when too large); why and where from travel in headers."""
    return [
        ("cptd-outcome", outcome.encode()),
        ("cptd-reason", reason.encode()),
        ("cptd-detail", detail.encode("utf-8", "replace")[:1000]),
        ("cptd-source-topic", topic.encode()),
        ("cptd-source-partition", str(partition).encode()),
        ("cptd-source-offset", str(offset).encode()),
        *extra,
    ]


def stuck_partition(consumer: KafkaConsumer) -> TopicPartition | None:
    """The partition whose fetched records the last `poll()` failed to decode, or None if that is not known.

    kafka-python raises a batch's decode error (corrupt compressed data, CRC mismatch) from poll() without
    saying which partition it came from, and leaves the position at the batch, so every later poll raises
    again. The fetcher keeps the failed partition's records as the next in line; this reads that private
    attribute (kafka-python 2.x/3.x), and returns None when it is absent so the caller re-raises.
    """
    part = getattr(getattr(consumer, "_fetcher", None), "_next_partition_records", None)
    topic_partition = getattr(part, "topic_partition", None)
    return topic_partition if isinstance(topic_partition, TopicPartition) else None


def broker_connected(consumer: KafkaConsumer) -> bool:
    """True while the consumer holds a live connection to at least one broker.

    kafka-python 3.0's `bootstrap_connected()` is true only while the first metadata fetch is in flight, so this
    looks at its connection manager's connections (private attributes, read with getattr, falling back).
    """
    conns = getattr(getattr(getattr(consumer, "_client", None), "_manager", None), "_conns", None)
    if not isinstance(conns, dict):
        return bool(consumer.bootstrap_connected())
    return any(getattr(c, "connected", False) for c in list(conns.values()))


def consumer_lag(consumer: KafkaConsumer, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
    parts = list(partitions)
    if not parts:
        return {}
    ends = consumer.end_offsets(parts)
    return {topic_partition: max(0, ends[topic_partition] - consumer.position(topic_partition)) for topic_partition in parts}
