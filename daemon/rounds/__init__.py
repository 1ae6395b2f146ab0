"""The round engine (docs/architecture.md §3): one module per phase over a small shared context.

runner.py        the lease, requests, and the state machine that sequences the phases
context.py       what the phases share: store, settings, policy, lease, serving, jobs, record writes
pending.py       PENDING: refuse a round that cannot deploy, before any document moves
snapshot.py      SNAPSHOT: take the round's documents, write its data files, measure drift
pool_choice.py   SNAPSHOT's curation: score the candidate pool, choose (policies/curation.py)
drift_measure.py the drift probe job: at SNAPSHOT and for the drift trigger
training.py      TRAINING: the TrainSpec, the trainer job, its progress
evaluating.py    EVALUATING: the evaluator job and the gate
approval.py      after the gate: deploy.mode auto (DEPLOYING), shadow (SHADOWED), approve (AWAITING_APPROVAL, decisions)
deploying.py     DEPLOYING: blackout windows, the swap, the watch; operator rollback; retention
document_fate.py where a round's documents go when it ends: back to the buffer, or on to replay
"""
