"""A round's job loop without Redis: the one store call `RoundContext.run_job` makes, and a bare round record.

Shared by the launcher tests (tests/test_job_launchers.py, tests/test_kubernetes_launcher.py); the whole round, with
a real store, is tested in tests/test_round_runner.py.
"""

from __future__ import annotations

from typing import Any

from daemon.round_record import RoundRecord, RoundState, Trigger
from daemon.rounds.context import RoundContext
from daemon.settings import Settings


class CancelFlag:
    """Stands in for the store: run_job asks it only whether the operator cancelled the round; writes are kept."""

    def __init__(self, cancel: bool = False) -> None:
        self.cancel = cancel
        self.record: dict[str, Any] | None = None

    def cancel_requested(self, round_id: str) -> bool:
        return self.cancel

    def put_round(self, fence: object, round_id: str, record: dict[str, Any]) -> None:
        self.record = record


def job_context(settings: Settings, store: CancelFlag, **kw: Any) -> RoundContext:
    """A context that holds the lease (any fence) and has no policy: enough to start, follow and end jobs."""
    return RoundContext(
        store=store,  # type: ignore[arg-type]
        settings=settings,
        get_policy=lambda: None,  # type: ignore[arg-type,return-value]
        owner="test",
        fence=object(),  # type: ignore[arg-type]
        **kw,
    )


def bare_record(rid: str = "r00001", state: RoundState = RoundState.PENDING) -> RoundRecord:
    return RoundRecord(
        id=rid,
        number=int(rid.lstrip("r")),
        state=state,
        created_at=0,
        updated_at=0,
        trigger=Trigger(kind="manual"),
        owner="t",
        policy_hash="",
    )
