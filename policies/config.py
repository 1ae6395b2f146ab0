"""The policy file: one YAML document that steers a deployment.

Each pure policy module owns the pydantic model of its own section (so the
thresholds live next to the rule that reads them); this module composes them
into the whole file, loads and validates it, and computes its content hash.
Errors name the field path and the allowed range, because operators edit this
file by hand in a ConfigMap and must see at once what they got wrong.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from policies.base import Section
from policies.collapse import CollapsePolicy
from policies.curation import OTHER_DOMAINS, CurationPolicy
from policies.dedup import DedupPolicy
from policies.drift import DriftPolicy
from policies.gates import GatePolicy
from policies.language_mix import LanguageMixPolicy
from policies.lr_schedule import SchedulePolicy
from policies.provenance import UNKNOWN_DOMAIN, ProvenancePolicy
from policies.quality import QualityPolicy
from policies.replay import ReplayPolicy
from policies.round_policy import DeployPolicy, RoundsPolicy, TriggerPolicy
from policies.train import TrainPolicy


class IngestPolicy(Section):
    topics: list[str] = Field(default=["cptd.documents"], min_length=1, description="Kafka topics to consume")
    group_id: str = Field(default="cptd-ingest", min_length=1, description="Kafka consumer group")
    dead_letter_topic: str = Field(default="cptd.dead-letter", min_length=1)
    dead_letter_filtered: bool = Field(
        default=True,
        description="also send documents rejected by quality filters to the dead-letter topic "
        "(with outcome=rejected), so nothing is unrecoverable",
    )
    max_message_bytes: int = Field(default=1_048_576, ge=64, le=64 * 1_048_576, description="larger messages are dead-lettered as oversize")
    batch_max_docs: int = Field(default=500, ge=1, le=100_000, description="documents per Redis transaction / offset commit")
    batch_max_wait_ms: int = Field(default=500, ge=1, le=60_000, description="longest wait to fill a batch")
    fetch_max_bytes: int = Field(
        default=4 * 1_048_576,
        ge=1_048_576,
        le=512 * 1_048_576,
        description="most bytes fetched from Kafka and not yet processed (a larger single record still comes whole); 4 MiB holds "
        "~1,000 typical documents, as fast end to end as 16 MiB, and bounds what a stream of multi-megabyte messages holds",
    )
    session_timeout_ms: int = Field(default=10_000, ge=1_000, le=300_000, description="Kafka group session timeout")
    heartbeat_interval_ms: int = Field(default=3_000, ge=100, le=60_000)
    max_poll_interval_ms: int = Field(default=300_000, ge=5_000, le=3_600_000)
    redis_retry_max_s: float = Field(default=30.0, gt=0, le=3600, description="longest back-off between Redis write retries")

    @model_validator(mode="after")
    def _heartbeat_below_session(self) -> IngestPolicy:
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError("ingest.heartbeat_interval_ms must be at most a third of ingest.session_timeout_ms")
        return self


class BufferPolicy(Section):
    max_docs: int = Field(default=200_000, ge=1, description="pause consumption when this many documents wait in the buffer")
    max_bytes: int = Field(default=2 * 1024**3, ge=1024, description="pause consumption when buffered text reaches this size")
    resume_fraction: float = Field(default=0.9, gt=0, le=1.0, description="resume when the buffer falls below this fraction of both caps")


class Policy(Section):
    """The whole policy file. Sections default to the documented defaults."""

    name: str = Field(
        default="default", pattern=r"^[a-z0-9][a-z0-9-]{0,62}$", description="deployment name; Redis keys live under cptd:{name}:"
    )
    ingest: IngestPolicy = IngestPolicy()
    buffer: BufferPolicy = BufferPolicy()
    quality: QualityPolicy = QualityPolicy()
    dedup: DedupPolicy = DedupPolicy()
    provenance: ProvenancePolicy = ProvenancePolicy()
    curation: CurationPolicy = CurationPolicy()
    collapse: CollapsePolicy = CollapsePolicy()
    gates: GatePolicy = GatePolicy()
    schedule: SchedulePolicy = SchedulePolicy()
    replay: ReplayPolicy = ReplayPolicy()
    language_mix: LanguageMixPolicy = LanguageMixPolicy()
    drift: DriftPolicy = DriftPolicy()
    train: TrainPolicy = TrainPolicy()
    rounds: RoundsPolicy = RoundsPolicy()
    triggers: TriggerPolicy = TriggerPolicy()
    deploy: DeployPolicy = DeployPolicy()

    def named_domains(self) -> frozenset[str]:
        """The domains the operator named (curation targets, source rules, classifier labels) and 'unknown'.

        A producer's `meta.domain` may be anything; this bounded set is what a metric label may say (the rest is
        counted as 'other'), so a producer cannot grow Prometheus's series without bound."""
        named = {*self.curation.domain_targets, *self.provenance.domain_sources, *self.provenance.classifier.examples}
        return frozenset(named - {OTHER_DOMAINS} | {UNKNOWN_DOMAIN})

    @model_validator(mode="after")
    def _dead_letter_not_consumed(self) -> Policy:
        if self.ingest.dead_letter_topic in self.ingest.topics:
            raise ValueError("ingest.dead_letter_topic must not be one of ingest.topics (it would loop)")
        echo = set(self.collapse.echo_topics)
        if echo & {*self.ingest.topics, self.ingest.dead_letter_topic}:
            raise ValueError("collapse.echo_topics must differ from ingest.topics and ingest.dead_letter_topic (never trained on)")
        refusal = self.curation.select_refusal()
        if refusal:
            raise ValueError(refusal)
        return self


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names every bad field."""


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        ctx = e.get("ctx") or {}
        bounds = ", ".join(f"{k} {v}" for k, v in ctx.items() if k in ("ge", "gt", "le", "lt", "min_length", "max_length", "pattern"))
        got = e.get("input")
        got_s = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
        lines.append(f"{loc}: {msg}{got_s}" + (f" [allowed: {bounds}]" if bounds else ""))
    return "; ".join(lines)


def parse_policy(data: Any, source: str = "<policy>") -> Policy:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: the policy file must be a YAML mapping, got {type(data).__name__}")
    try:
        return Policy.model_validate(data)
    except ValidationError as e:
        raise PolicyError(f"{source}: {_describe(e)}") from None


def load_policy(path: str | Path) -> Policy:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise PolicyError(f"{p}: cannot read policy file: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PolicyError(f"{p}: not valid YAML: {e}") from None
    return parse_policy(data, str(p))


def policy_hash(policy: Policy) -> str:
    """Hash of the effective policy (defaults filled in), so comments and key order don't change it."""
    blob = json.dumps(policy.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
