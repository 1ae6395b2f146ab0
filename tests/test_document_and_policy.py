"""Message parsing and policy-file validation: every bad input is named."""

from __future__ import annotations

import json

import pytest

from policies.config import PolicyError, load_policy, parse_policy, policy_hash
from policies.document import MALFORMED_REASONS, Document, Malformed, parse_message


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"", "empty_message"),
        (None, "empty_message"),
        (b"x" * 101, "oversize"),
        (b"caf\xe9", "invalid_utf8"),
        (b'{"text": "a', "invalid_json"),
        (b'{"id": "1"}', "missing_text"),
        (b'{"text": ["a"]}', "invalid_field"),
        (b'{"text": "ok", "ts": "yesterday"}', "invalid_field"),
        (b'{"text": "ok", "meta": [1]}', "invalid_field"),
        (b'{"text": "ok", "source": 3}', "invalid_field"),
        (b'{"text": "  "}', "empty_text"),
        (b"  \n\t", "empty_text"),
    ],
)
def test_malformed_messages_get_their_reason(raw, reason):
    got = parse_message(raw, max_bytes=100)
    assert isinstance(got, Malformed) and got.reason == reason and got.detail
    assert got.reason in MALFORMED_REASONS


def test_json_and_plain_text_documents():
    d = parse_message(json.dumps({"text": "hello", "id": "7", "source": "s", "lang": "en", "ts": 3, "meta": {"a": 1}}).encode(), 1000)
    assert d == Document(text="hello", id="7", source="s", lang="en", ts=3.0, meta={"a": 1})
    assert parse_message(b"[citation needed] plain prose", 1000) == Document(text="[citation needed] plain prose")


def test_policy_errors_name_the_field_and_range(tmp_path):
    with pytest.raises(PolicyError) as e:
        parse_policy({"ingest": {"batch_max_docs": 0}})
    assert "ingest.batch_max_docs" in str(e.value) and "ge 1" in str(e.value)
    with pytest.raises(PolicyError) as e:
        parse_policy({"buffer": {"max_dcos": 5}})
    assert "buffer.max_dcos" in str(e.value)
    with pytest.raises(PolicyError, match="dead_letter_topic"):
        parse_policy({"ingest": {"topics": ["a"], "dead_letter_topic": "a"}})
    bad = tmp_path / "p.yaml"
    bad.write_text("ingest: [unclosed")
    with pytest.raises(PolicyError, match="not valid YAML"):
        load_policy(bad)


def test_policy_hash_ignores_formatting_but_not_values(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("name: x\nbuffer: {max_docs: 10}\n")
    b.write_text("# comment\nbuffer:\n  max_docs: 10\nname: x\n")
    assert policy_hash(load_policy(a)) == policy_hash(load_policy(b))
    assert policy_hash(load_policy(a)) != policy_hash(parse_policy({"name": "x", "buffer": {"max_docs": 11}}))


def test_example_policy_is_valid():
    from pathlib import Path

    load_policy(Path(__file__).resolve().parent.parent / "deploy" / "policy.example.yaml")
