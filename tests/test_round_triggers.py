"""daemon/round_triggers.py with a real APScheduler BackgroundScheduler: which jobs ask for a round, and when."""

import threading

import pytest

from daemon.round_triggers import Scheduler
from policies.round_policy import TriggerPolicy


class Requests:
    """Records request(kind, detail) calls; wait() blocks until one of a kind arrives."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        self._cond = threading.Condition()

    def __call__(self, kind: str, detail: str) -> None:
        with self._cond:
            self.calls.append((kind, detail))
            self._cond.notify_all()

    def count(self, kind: str) -> int:
        with self._cond:
            return sum(1 for k, _ in self.calls if k == kind)

    def wait(self, kind: str, n: int = 1, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: sum(1 for k, _ in self.calls if k == kind) >= n, timeout)


class Calls:
    """A callable returning a settable value that signals each time it is called."""

    def __init__(self, value):
        self.value = value
        self.n = 0
        self._cond = threading.Condition()

    def __call__(self):
        with self._cond:
            self.n += 1
            self._cond.notify_all()
            return self.value

    def wait_calls(self, n: int, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.n >= n, timeout)


@pytest.fixture
def sched():
    req = Requests()
    s = Scheduler(req)
    s.request_log = req
    yield s
    s.shutdown()


def test_interval_trigger_requests_a_round(sched):
    fired = threading.Event()
    sched.request = lambda kind, detail: fired.set() if kind == "interval" else None
    sched.apply(TriggerPolicy(interval_s=0.2), lambda: 0, lambda: None)
    sched.start()
    assert fired.wait(timeout=60)  # a condition, generous for a busy machine
    jobs = sched.jobs()
    assert [j["id"] for j in jobs] == ["interval"] and jobs[0]["next_run_time"]


def test_buffer_trigger_fires_only_at_the_threshold(sched):
    req: Requests = sched.request_log
    tokens = Calls(499)
    sched.apply(TriggerPolicy(buffer_tokens=500, buffer_check_interval_s=0.5), tokens, lambda: None)
    sched.start()
    assert tokens.wait_calls(2), "buffer job never ran"
    assert req.count("buffer") == 0  # checked twice below the threshold, asked for nothing
    tokens.value = 500
    assert req.wait("buffer", timeout=5)
    assert req.calls[0] == ("buffer", "buffer holds 500 tokens >= 500")


def test_drift_trigger_fires_at_the_threshold_and_not_without_a_score(sched):
    req: Requests = sched.request_log
    score = Calls(None)
    # drift_probe_interval_s has a floor of 10 s in the schema; model_copy skips validation,
    # so the real job runs every 0.2 s here.
    policy = TriggerPolicy(drift_score=0.5).model_copy(update={"drift_probe_interval_s": 0.2})
    sched.apply(policy, lambda: 0, score)
    sched.start()
    assert score.wait_calls(2), "drift job never ran"
    assert req.count("drift") == 0  # no measurement: no round
    score.value = 0.49
    n = score.n
    assert score.wait_calls(n + 2)
    assert req.count("drift") == 0
    score.value = 0.5
    assert req.wait("drift", timeout=5)
    assert req.calls[0] == ("drift", "drift score 0.500 >= 0.5")


def test_apply_again_replaces_changed_jobs(sched):
    req: Requests = sched.request_log
    sched.apply(TriggerPolicy(interval_s=0.2), lambda: 0, lambda: None)
    sched.start()
    assert req.wait("interval", timeout=5)
    # Now only a buffer trigger: the interval job is gone.
    tokens = Calls(1000)
    sched.apply(TriggerPolicy(buffer_tokens=10, buffer_check_interval_s=0.5), tokens, lambda: None)
    assert [j["id"] for j in sched.jobs()] == ["buffer"]
    # Counted after the first buffer check (0.5 s on), so a run of the old job dispatched just
    # before apply() has long finished; the next two checks span 1 s, five old intervals.
    assert req.wait("buffer", timeout=5)
    before = req.count("interval")
    assert req.wait("buffer", n=3, timeout=5)
    assert req.count("interval") == before


def test_apply_with_unchanged_settings_keeps_the_schedule(sched):
    sched.apply(TriggerPolicy(interval_s=3600, cron="0 3 * * *"), lambda: 0, lambda: None)
    sched.start()
    first = {j["id"]: j["next_run_time"] for j in sched.jobs()}
    sched.apply(TriggerPolicy(interval_s=3600, cron="0 3 * * *", min_gap_s=5), lambda: 0, lambda: None)
    assert {j["id"]: j["next_run_time"] for j in sched.jobs()} == first
    sched.apply(TriggerPolicy(interval_s=7200, cron="0 3 * * *"), lambda: 0, lambda: None)
    second = {j["id"]: j["next_run_time"] for j in sched.jobs()}
    assert second["cron"] == first["cron"] and second["interval"] != first["interval"]
    sched.apply(TriggerPolicy(), lambda: 0, lambda: None)
    assert sched.jobs() == []


def test_a_failing_callable_is_logged_and_the_job_keeps_running(sched, caplog):
    calls = Calls(None)

    def broken() -> int:
        calls()
        raise RuntimeError("redis down")

    sched.apply(TriggerPolicy(buffer_tokens=1, buffer_check_interval_s=0.5), broken, lambda: None)
    with caplog.at_level("ERROR", logger="cptd.scheduler"):
        sched.start()
        assert calls.wait_calls(2), "job stopped after its first error"
    assert any("trigger job failed" in r.message for r in caplog.records)
    assert sched.request_log.calls == []


def test_jobs_before_start_and_an_invalid_policy_keeps_the_old_jobs(sched):
    sched.apply(TriggerPolicy(cron="0 3 * * *"), lambda: 0, lambda: None)
    assert sched.jobs() == [{"id": "cron", "trigger": sched.jobs()[0]["trigger"], "next_run_time": None}]
    bad = TriggerPolicy.model_construct(
        cron="not a cron", interval_s=None, buffer_tokens=None, drift_score=None, timezone="UTC", blackout=[]
    )
    with pytest.raises(ValueError, match="not a cron"):
        sched.apply(bad, lambda: 0, lambda: None)
    assert [j["id"] for j in sched.jobs()] == ["cron"]
