"""No message can stop ingest (issue 13): the message path fuzzed, the JSON depth bound, truncated
dead letters and the crash-loop guard's decisions. Fast tier: no broker, no Redis.

The end-to-end poison, codec and memory checks against tansu and Redis are in tests/test_ingest.py.
"""

from __future__ import annotations

import hashlib
import json
import random
import time

from hypothesis import HealthCheck, given, settings, strategies

from connectors.kafka import dead_letter_value
from daemon.ingest import guard_plan
from policies.config import Policy
from policies.dedup import document_keys
from policies.document import ISOLATION_REASONS, MALFORMED_REASONS, MAX_JSON_DEPTH, Document, Malformed, json_depth, parse_message
from policies.quality import build_filters, judge

POLICY = Policy()
FILTERS = build_filters(POLICY.quality)
MAX_BYTES = 65_536

# Characters producers get wrong: lone surrogates, zero-width and joiners, RTL/LTR overrides and isolates,
# NUL and other controls, BOM, combining marks, non-characters, astral emoji.
ODD_CHARS = ["\ud800", "\udfff", "\u200b", "\u200c", "\u200d", "\u2060", "\u202e", "\u202d", "\u2067", "\u0000", "\x1b", "\ufeff"]
ODD_CHARS += ["\u0301", "\ufffe", "\uffff", "\U0001f600", "\u0645\u0631\u062d\u0628\u0627", "\u05e9\u05dc\u05d5\u05dd", "\r\n", "\t"]
PIECES = ["the ", "word ", ". ", "{", "[", '"', "\\", " "]


def random_text(rng: random.Random) -> str:
    """Up to 60 pieces: odd characters, common words and JSON punctuation, and random code points of any plane.

    Drawn from one seeded Random rather than character by character, which keeps 10,000 examples well under a minute.
    """
    out = []
    for _ in range(rng.randrange(61)):
        kind = rng.random()
        if kind < 0.35:
            out.append(rng.choice(ODD_CHARS))
        elif kind < 0.7:
            out.append(rng.choice(PIECES))
        else:
            out.append("".join(chr(rng.randrange(0x110000 if rng.random() < 0.3 else 0x800)) for _ in range(rng.randrange(1, 9))))
    return "".join(out)


seeds = strategies.integers(min_value=0, max_value=2**32).map(random.Random)  # one draw per value; strategies.randoms() draws per call
odd_text = strategies.builds(random_text, seeds)
random_bytes = strategies.builds(lambda rng: rng.randbytes(rng.randrange(2_000)), seeds)


def random_leaf(rng: random.Random) -> object:
    """None, a bool, an int up to 10**30, a float (NaN and infinities included) or odd text."""
    k = rng.randrange(6)
    if k == 0:
        return None
    if k == 1:
        return rng.random() < 0.5
    if k == 2:
        return rng.randrange(-(10**30), 10**30)
    if k == 3:
        return rng.choice([float("nan"), float("inf"), float("-inf"), -0.0, 1e308, 5e-324, rng.uniform(-1e9, 1e9)])
    return random_text(rng)


def random_json(rng: random.Random, budget: int = 12) -> object:
    """A JSON value of lists and objects (odd-text keys) with at most about `budget` leaves."""
    if budget <= 1 or rng.random() < 0.4:
        return random_leaf(rng)
    n = rng.randrange(1, 6)
    if rng.random() < 0.5:
        return [random_json(rng, budget // n) for _ in range(n)]
    return {random_text(rng): random_json(rng, budget // n) for _ in range(n)}


json_leaf = strategies.builds(random_leaf, seeds)
field_value = strategies.one_of(strategies.builds(random_json, seeds), odd_text)


@strategies.composite
def json_message(draw) -> bytes:
    """A JSON object with text/id/source/lang/ts/meta of any type, sometimes wrapped very deep or made very wide."""
    obj = {
        k: draw(field_value) for k in draw(strategies.sets(strategies.sampled_from(["text", "id", "source", "lang", "ts", "meta", "x"])))
    }
    shape = draw(strategies.sampled_from(["flat", "deep", "wide"]))
    if shape == "wide":
        obj["meta"] = {str(i): i for i in range(draw(strategies.integers(min_value=0, max_value=1_000)))}
    # ensure_ascii=True turns lone surrogates into \udXXX escapes; False writes them raw (invalid UTF-8 after surrogatepass)
    text = json.dumps(obj, ensure_ascii=draw(strategies.booleans()), allow_nan=True)
    if shape == "deep":  # written as text: json.dumps itself recurses per level
        depth = draw(strategies.integers(min_value=1, max_value=2_000))
        opener = draw(strategies.sampled_from(["[", '{"k": ', '[{"k": ']))
        closer = {"[": "]", '{"k": ': "}", '[{"k": ': "}]"}[opener]
        deep = opener * depth + json.dumps(draw(json_leaf)) + closer * depth
        text = text[:-1] + (", " if len(text) > 2 else "") + '"meta": ' + deep + "}"
    return text.encode("utf-8", "surrogatepass")


messages = strategies.one_of(
    random_bytes,
    json_message(),
    odd_text.map(lambda t: t.encode("utf-8", "surrogatepass")),
    strategies.builds(lambda t: json.dumps({"text": t}).encode(), odd_text),
    strategies.builds(
        lambda n: b'{"text": "x", "meta": ' + b"[" * n + b"]" * n + b"}", strategies.integers(min_value=0, max_value=120_000)
    ),
)


def message_path(value: bytes) -> str:
    """parse -> quality filters -> dedup keys -> the stored record, as daemon/ingest.py runs them; returns the outcome."""
    parsed = parse_message(value, MAX_BYTES)
    if isinstance(parsed, Malformed):
        assert parsed.reason in MALFORMED_REASONS and parsed.detail
        return parsed.reason
    verdict = judge(parsed.text, FILTERS)
    text = verdict.text or parsed.text
    # Hash every parsed text, accepted or not: the filters reject most random text, and dedup must hold on all of it.
    (dk,) = document_keys([text], POLICY.dedup)
    record = {"text": text, "id": parsed.id, "source": parsed.source, "lang": parsed.lang, "ts": parsed.ts, "meta": parsed.meta}
    json.dumps({**record, "bands": list(dk.band_keys), "bytes": len(text.encode("utf-8"))}, ensure_ascii=False).encode("utf-8")
    return "accepted" if verdict.accepted else "rejected"


def test_fuzz_message_path_raises_nothing_on_10k_hostile_messages():
    outcomes: dict[str, int] = {}
    t0 = time.perf_counter()

    @settings(max_examples=10_000, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)
    @given(messages)
    def run(value: bytes) -> None:
        o = message_path(value)
        outcomes[o] = outcomes.get(o, 0) + 1

    run()
    n = sum(outcomes.values())
    print(f"fuzzed {n} messages in {time.perf_counter() - t0:.1f} s, 0 escaped: {dict(sorted(outcomes.items()))}")
    assert n >= 10_000
    assert outcomes.get("invalid_json") and outcomes.get("invalid_utf8") and outcomes.get("rejected")


def test_depth_bound_refuses_deep_json_before_parsing():
    deep = b'{"text": "a", "meta": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    got = parse_message(deep, 10**7)
    assert isinstance(got, Malformed) and got.reason == "invalid_json" and "100001 levels deep" in got.detail
    ok = json.dumps({"text": "a", "meta": {"a": [[[1]]]}, "brackets": "[" * 500}).encode()
    assert isinstance(parse_message(ok, 10**6), Document)  # brackets inside strings do not count
    at_limit = b'{"text": "a", "m": ' + b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1) + b"}"
    assert isinstance(parse_message(at_limit, 10**6), Document) and json_depth(at_limit.decode()) == MAX_JSON_DEPTH


def test_values_json_cannot_hold_are_invalid_json_with_the_reason():
    huge_int = parse_message(b'{"text": "a", "ts": ' + b"9" * 5000 + b"}", 10**6)
    assert isinstance(huge_int, Malformed) and huge_int.reason == "invalid_json" and "ValueError" in huge_int.detail
    lone = parse_message(b'{"text": "a\\ud800b"}', 1000)
    assert isinstance(lone, Malformed) and lone.reason == "invalid_json" and "surrogate" in lone.detail
    pair = parse_message(b'{"text": "a\\ud83d\\ude00"}', 1000)
    assert pair == Document(text="a\U0001f600")


def test_isolation_reasons_are_their_own_codes():
    assert set(ISOLATION_REASONS) == {"internal_error", "crash_loop", "corrupt_batch"}
    assert not set(ISOLATION_REASONS) & set(MALFORMED_REASONS)


def test_dead_letter_value_truncates_only_what_does_not_fit():
    small = b"x" * 100
    assert dead_letter_value(small, 100) == (small, [])
    assert dead_letter_value(None, 100) == (None, [])
    big = bytes(range(256)) * 20_000  # 5,120,000 bytes: 78 times the limit
    value, headers = dead_letter_value(big, 65_536)
    assert value == big[:65_536]
    assert dict(headers) == {
        "cptd-truncated": b"1",
        "cptd-original-bytes": b"5120000",
        "cptd-original-sha256": hashlib.sha256(big).hexdigest().encode(),
    }


TP = ("docs", 0)


def _marker(owner, start, end, prior=0, suspect_end=-1):
    return {"owner": owner, "start": start, "end": end, "prior": prior, "suspect_end": suspect_end}


def test_guard_plan_batches_normally_and_retries_its_own_batch_as_a_batch():
    assert guard_plan({TP: 10}, {TP: 10}, {}, "me") == {TP: ("batch", _marker("me", 10, 10))}
    # this process's own unwritten batch (Redis was down) is not a death
    assert guard_plan({TP: 10}, {TP: 10}, {TP: _marker("me", 10, 29)}, "me")[TP][0] == "batch"
    # another process's batch that was written is not a death either
    assert guard_plan({TP: 30}, {TP: 30}, {TP: _marker("old", 10, 29)}, "me")[TP][0] == "batch"


def test_guard_plan_walks_a_dead_batch_one_message_at_a_time_and_poisons_an_offset_after_two_deaths():
    # The process died with 10..29 in flight: one at a time up to 29, each counted as one death so far.
    mode, m = guard_plan({TP: 10}, {TP: 10}, {TP: _marker("old", 10, 29)}, "me")[TP]
    assert (mode, m) == ("single", _marker("me", 10, 10, prior=1, suspect_end=29))
    # 10 went through; 15 is next, still inside the suspect range
    mode, m = guard_plan({TP: 15}, {TP: 15}, {TP: _marker("me", 14, 14, 1, 29)}, "me")[TP]
    assert (mode, m) == ("single", _marker("me", 15, 15, prior=1, suspect_end=29))
    # the process died again on 15 alone: second death with 15 in flight -> dead-letter it unprocessed
    mode, m = guard_plan({TP: 15}, {TP: 15}, {TP: _marker("me-before", 15, 15, 1, 29)}, "me")[TP]
    assert mode == "poison" and m["prior"] == 2
    # past the suspect range: whole batches again
    assert guard_plan({TP: 30}, {TP: 30}, {TP: _marker("me", 29, 29, 1, 29)}, "me")[TP][0] == "batch"
