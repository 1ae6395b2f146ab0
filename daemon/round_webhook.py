"""The round-end webhook: one POST of a small JSON when a round reaches a terminal state (CPTD_ROUND_WEBHOOK_URL).

So that an Airflow or Argo step, or a chat channel, hears of a round's end without polling the API. The URL is a
setting, not policy: webhook URLs often carry a secret (Slack's do), and secrets never go in the policy file.
It is sent from a thread, retried a bounded number of times (tenacity: connection errors, 429 and 5xx; at most
ATTEMPTS tries of TIMEOUT_S each, about 25 s in all), and never raises: a webhook that is down must not fail,
delay or block a round. One given up on is logged and counted (cptd_round_webhooks_total{outcome="failed"}).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Literal
from urllib.parse import urlsplit

import httpx
import tenacity
from pydantic import BaseModel

from daemon import metrics as M
from daemon.round_record import RoundRecord, RoundState

log = logging.getLogger("cptd.rounds")

ATTEMPTS = 4
TIMEOUT_S = 5.0
WAIT = tenacity.wait_exponential(multiplier=0.5, max=4)


class RoundEnded(BaseModel):
    """The webhook's body."""

    event: Literal["round.ended"] = "round.ended"
    deployment: str
    round: str
    state: RoundState
    cancelled: bool  # FAILED because an operator cancelled it
    reason: str | None  # the error of a failed round; a rejected one's gate reason codes, or "approval rejected|timed_out"
    parent: str | None  # the version the round trained from
    deployed_version: str | None  # the version serving once the round ended (the round itself when DEPLOYED; never SHADOWED)
    at: float


def round_ended(rec: RoundRecord, deployment: str, serving_version: str | None) -> RoundEnded:
    reason = rec.error
    if reason is None and rec.state == RoundState.REJECTED and rec.approval is not None and rec.approval.decision:
        reason = f"approval {rec.approval.decision}" + (f" by {rec.approval.by}" if rec.approval.by else "")
    elif reason is None and rec.state == RoundState.REJECTED and rec.gate is not None:
        reason = ", ".join(r.code for r in rec.gate.reasons) or None
    return RoundEnded(
        deployment=deployment,
        round=rec.id,
        state=rec.state,
        cancelled=rec.cancelled,
        reason=reason,
        parent=rec.parent.version,
        deployed_version=rec.id if rec.state == RoundState.DEPLOYED else serving_version,
        at=time.time(),
    )


def _worth_retrying(e: BaseException) -> bool:
    if isinstance(e, httpx.HTTPStatusError):
        return e.response.status_code == 429 or e.response.status_code >= 500
    return isinstance(e, httpx.TransportError)


def post(url: str, event: RoundEnded, attempts: int = ATTEMPTS, wait: tenacity.wait.wait_base = WAIT) -> bool:
    """POST `event` to `url`; True when it was taken (2xx). Never raises."""
    where = urlsplit(url).netloc  # the path and query may hold the webhook's secret: never logged
    try:
        for attempt in tenacity.Retrying(
            stop=tenacity.stop_after_attempt(attempts), wait=wait, retry=tenacity.retry_if_exception(_worth_retrying), reraise=True
        ):
            with attempt:
                httpx.post(url, json=event.model_dump(mode="json"), timeout=TIMEOUT_S).raise_for_status()
    except Exception as e:  # noqa: BLE001 - a webhook never fails a round: logged and counted
        M.ROUND_WEBHOOKS.labels(outcome="failed").inc()
        why = f"HTTP {e.response.status_code}" if isinstance(e, httpx.HTTPStatusError) else f"{type(e).__name__}: {e}"  # no URL
        log.warning("round webhook failed", extra={"round_id": event.round, "host": where, "error": why})
        return False
    M.ROUND_WEBHOOKS.labels(outcome="sent").inc()
    log.info("round webhook sent", extra={"round_id": event.round, "host": where, "state": event.state.value})
    return True


def send(url: str, event: RoundEnded) -> threading.Thread:
    """`post` in a daemon thread: the round goes on (and the process may exit) without waiting for it."""
    t = threading.Thread(target=post, args=(url, event), name=f"round-webhook-{event.round}", daemon=True)
    t.start()
    return t
