"""`cptd trigger --wait` and `cptd round ID --wait`: follow a round to its end over the daemon's API, so that a
workflow step (Airflow, Argo) needs no polling loop of its own; the exit code says how it ended (cli_exit.Exit).

A trigger answered `queued` (this daemon does not hold the round lease) is followed through `GET /requests/{id}`
to the round the lease holder started. A daemon that stops answering during a wait (a rolling restart) is retried
for UNREACHABLE_GRACE_S before the wait gives up.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from daemon.cli_exit import ApiError, CliError, Exit
from daemon.round_record import RoundRecord, RoundState

UNREACHABLE_GRACE_S = 300.0

Get = Callable[[str], Any]  # GET a path of the daemon's API (ApiError when it fails)


def deadline(a: argparse.Namespace) -> float | None:
    """When --timeout runs out (monotonic clock); None without one. Refuses a negative --timeout or --poll."""
    if a.timeout is not None and a.timeout < 0:
        raise CliError(f"--timeout {a.timeout}: must be 0 or more seconds")
    if a.poll <= 0:
        raise CliError(f"--poll {a.poll}: must be more than 0 seconds")
    return time.monotonic() + a.timeout if a.timeout is not None else None


def outcome(rec: RoundRecord) -> Exit:
    """The exit code of a round that ended."""
    if rec.state == RoundState.DEPLOYED:
        return Exit.OK
    if rec.state == RoundState.REJECTED:
        return Exit.REJECTED
    if rec.state == RoundState.SHADOWED:
        return Exit.SHADOWED
    if rec.cancelled:
        return Exit.CANCELLED
    return Exit.FAILED if rec.state == RoundState.FAILED else Exit.OTHER_END


def _pause(a: argparse.Namespace, until: float | None) -> None:
    time.sleep(a.poll if until is None else max(0.0, min(a.poll, until - time.monotonic())))


def _read(a: argparse.Namespace, get: Get, path: str, until: float | None, missing_ok: bool = False) -> Any | None:
    """GET `path`; a daemon that does not answer is asked again for UNREACHABLE_GRACE_S, within `until`.
    None: `until` passed, or (`missing_ok`) the daemon answered 404."""
    down_since: float | None = None
    while True:
        try:
            return get(path)
        except ApiError as e:
            if e.status == 404 and missing_ok:
                return None
            if e.status is not None:
                raise
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since >= UNREACHABLE_GRACE_S:
                raise
        if until is not None and time.monotonic() >= until:
            return None
        _pause(a, until)


def await_answer(a: argparse.Namespace, get: Get, queued: dict[str, Any], until: float | None) -> dict[str, Any] | None:
    """The lease holder's answer to a queued trigger; None when `until` passed first (said as a timeout)."""
    req = queued["request_id"]
    while (ans := _read(a, get, f"/requests/{req}", until, missing_ok=True)) is None:
        if until is not None and time.monotonic() >= until:
            say_timeout(a, None, f"request {req} not answered by the lease holder {queued.get('lease_holder')!r}")
            return None
        _pause(a, until)
    return dict(ans)


def wait_round(a: argparse.Namespace, get: Get, rid: str, until: float | None) -> Exit:
    """Read the round every --poll seconds until it ends or `until` passes; say each new state (for people) or the
    end (--json, one object), and return the exit code of its end or Exit.TIMEOUT."""
    seen: RoundState | None = None
    while True:
        raw = _read(a, get, f"/rounds/{rid}", until)
        if raw is None:
            say_timeout(a, rid, f"round {rid} still {seen.value if seen else 'unread'} at --timeout {a.timeout:g} s")
            return Exit.TIMEOUT
        rec = RoundRecord.model_validate(raw)
        if rec.state != seen and not a.json:
            print(f"round {rid} {rec.state.value}" + (f": {rec.error}" if rec.error else "") + _waiting(rec), flush=True)
        seen = rec.state
        if rec.state.terminal:
            code = outcome(rec)
            if a.json:
                print(json.dumps({"round": rid, "state": rec.state.value, "cancelled": rec.cancelled, "error": rec.error,
                                  "exit": int(code), "outcome": code.name}))  # fmt: skip
            else:
                print(f"round {rid} ended {rec.state.value}{' (cancelled)' if rec.cancelled else ''}: exit {int(code)}")
            return code
        if until is not None and time.monotonic() >= until:
            say_timeout(a, rid, f"round {rid} still {rec.state.value} at --timeout {a.timeout:g} s")
            return Exit.TIMEOUT
        _pause(a, until)


def _waiting(rec: RoundRecord) -> str:
    """What a round waiting for approval needs, said once when the wait sees it begin."""
    if rec.state != RoundState.AWAITING_APPROVAL or rec.approval is None:
        return ""
    until = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(rec.approval.deadline))
    return f" (cptd approve {rec.id} | cptd reject {rec.id}; rejected if undecided at {until})"


def say_timeout(a: argparse.Namespace, rid: str | None, message: str) -> None:
    if a.json:
        print(json.dumps({"round": rid, "error": message, "exit": int(Exit.TIMEOUT), "outcome": Exit.TIMEOUT.name}))
    else:
        print(f"cptd: {message}", file=sys.stderr)
