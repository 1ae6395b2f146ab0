"""Between deploys, keep every replica on the deployed version: adopt the discovered set, reconcile what drifted.

A vLLM pod restarted behind the daemon's back comes back (often on a new address) serving its boot checkpoint
under the label "default", without the adapters loaded at runtime: until something notices, clients get mixed
versions. The lease holder's upkeep thread (daemon/rounds/runner.py) calls `upkeep` at every discovery refresh:
a replica set that changed is adopted and the new replicas reconciled at once; every
`rounds.reconcile_interval_s` a cheap check (label and adapter list per replica, no checksums) finds the rest,
and only a replica found out of step costs a full reconcile (checksums, smoke completion, swap back).

Nothing is done while a round is DEPLOYING (its deploy or the take-over's reconcile converges the replicas) or
while a deploy or rollback holds the serving lock: the pass is skipped and the next one tries again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from daemon.rounds.context import RoundContext
from daemon.rounds.deploying import reconcile_locked

log = logging.getLogger("cptd.rounds")


@dataclass
class UpkeepPass:
    added: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    out_of_step: list[str] = field(default_factory=list)
    checked: bool = False  # the periodic check ran in this pass
    reconciled: bool = False


def upkeep(ctx: RoundContext, urls: list[str], deploying_now: Callable[[], bool], check: bool) -> UpkeepPass | None:
    """One pass over the replica set `urls`; `check` runs the periodic check. None when skipped (busy)."""
    serving = ctx.serving
    if serving is None or ctx.fence is None or not ctx.serving_lock.acquire(blocking=False):
        return None
    try:
        if deploying_now():
            return None
        out = UpkeepPass()
        out.added, out.dropped = serving.set_replicas(urls)
        if out.added or out.dropped:
            log.info("serving adopted the discovered replica set", extra={"added": out.added, "dropped": out.dropped})
        if check and not out.added:
            out.checked, out.out_of_step = True, serving.out_of_step()
        if out.added or out.out_of_step:
            if out.out_of_step:
                log.warning("replicas out of step with the deployed version: reconciling", extra={"replicas": out.out_of_step})
            reconcile_locked(ctx)
            out.checked = out.reconciled = True
        return out
    finally:
        ctx.serving_lock.release()
