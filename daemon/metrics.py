"""Every Prometheus metric cptd exports, defined once.

The Grafana dashboard and the alert rules in deploy/ query exactly these names
(a test checks it), so a metric is renamed here or nowhere.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

REGISTRY = CollectorRegistry(auto_describe=True)

# --- ingest -----------------------------------------------------------------
INGEST_DOCS = Counter(
    "cptd_ingest_docs_total",
    "Kafka messages consumed, by final outcome (accepted, duplicate, near_duplicate, rejected, dead_lettered) "
    "and reason code. Mirrors the counters kept in Redis, which survive restarts.",
    ["outcome", "reason"],
    registry=REGISTRY,
)
INGEST_PROVENANCE = Counter(
    "cptd_ingest_provenance_total",
    "Accepted documents by provenance class (human, unknown, synthetic; policies/provenance.py). Totals survive restarts in "
    "Redis and are shown by /status.",
    ["provenance"],
    registry=REGISTRY,
)
INGEST_ECHOES = Counter(
    "cptd_ingest_echoes_total",
    "Incoming documents that near-duplicate an indexed completion of the served model, by action (dead_letter, mark_synthetic)",
    ["action"],
    registry=REGISTRY,
)
ECHO_INDEX_DOCS = Gauge("cptd_echo_index_docs", "Completions of the served model held in the echo index", registry=REGISTRY)
INGEST_BATCHES = Counter("cptd_ingest_batches_total", "Batches written to Redis and committed to Kafka", registry=REGISTRY)
INGEST_BATCH_SECONDS = Histogram(
    "cptd_ingest_batch_seconds",
    "Time to filter, dedup and write one batch",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
INGEST_PAUSED = Gauge(
    "cptd_ingest_paused", "1 while consumption is paused, by cause (buffer_full, redis_down, operator)", ["cause"], registry=REGISTRY
)
INGEST_LAST_COMMIT = Gauge("cptd_ingest_last_commit_timestamp_seconds", "Unix time of the last offset commit", registry=REGISTRY)
INGEST_LAG = Gauge(
    "cptd_ingest_consumer_lag", "Messages behind the end of each assigned partition", ["topic", "partition"], registry=REGISTRY
)
REDIS_ERRORS = Counter("cptd_redis_errors_total", "Redis operations that failed (connection lost, timeout)", ["op"], registry=REGISTRY)
DEAD_LETTER_PRODUCE_ERRORS = Counter(
    "cptd_dead_letter_produce_errors_total", "Dead-letter sends that failed (the batch is retried, nothing committed)", registry=REGISTRY
)
INGEST_OFFSET_GAPS = Counter(
    "cptd_ingest_offset_gaps_total",
    "Batches starting above their partition's stored next offset: refused (Redis lost accounted batches; the partition "
    "is re-read from the stored offset) or accepted (met again right after that re-read: Kafka has no record there)",
    ["action"],
    registry=REGISTRY,
)
for _action in ("refused", "accepted"):  # exported at 0 from the start, so the first gap is an increase to alert on
    INGEST_OFFSET_GAPS.labels(_action)
KAFKA_ERRORS = Counter(
    "cptd_kafka_errors_total",
    "Broker calls of the ingest loop that failed with a retriable Kafka error (a broker restarting, the group "
    "coordinator moving); ingest holds its batch and retries with back-off instead of exiting",
    ["op"],
    registry=REGISTRY,
)
INGEST_CORRUPT_RECORDS = Counter(
    "cptd_ingest_corrupt_records_total",
    "Offsets skipped because the Kafka record batch holding them could not be decoded (corrupt compressed data, CRC "
    "mismatch); each is dead-lettered by reference with reason corrupt_batch",
    ["topic", "partition"],
    registry=REGISTRY,
)

# --- buffer and replay store --------------------------------------------------
BUFFER_DOCS = Gauge("cptd_buffer_docs", "Documents waiting in the buffer for the next round", registry=REGISTRY)
BUFFER_BYTES = Gauge("cptd_buffer_bytes", "UTF-8 bytes of text waiting in the buffer", registry=REGISTRY)
BUFFER_TOKENS = Gauge(
    "cptd_buffer_tokens_estimate", "Estimated tokens waiting in the buffer (bytes / rounds.bytes_per_token)", registry=REGISTRY
)
BUFFER_CAP_DOCS = Gauge("cptd_buffer_cap_docs", "Buffer cap in documents from the policy file", registry=REGISTRY)
BUFFER_CAP_BYTES = Gauge("cptd_buffer_cap_bytes", "Buffer cap in bytes from the policy file", registry=REGISTRY)
REPLAY_DOCS = Gauge("cptd_replay_docs", "Documents in the replay reservoir", registry=REGISTRY)
REPLAY_CAP_DOCS = Gauge("cptd_replay_cap_docs", "Replay reservoir cap in documents", registry=REGISTRY)
DEDUP_KEYS = Gauge(
    "cptd_dedup_keys",
    "Entries in the dedup indexes, by kind (exact, lsh); read every 5 s by each ingest process",
    ["kind"],
    registry=REGISTRY,
)

# --- rounds -------------------------------------------------------------------
ROUNDS = Counter(
    "cptd_rounds_total",
    "Rounds that reached a terminal state, by state (DEPLOYED, REJECTED, FAILED, ROLLED_BACK, SHADOWED)",
    ["state"],
    registry=REGISTRY,
)
ROUND_PHASE = Gauge(
    "cptd_round_phase",
    "1 for the phase the current round is in (PENDING ... AWAITING_APPROVAL, DEPLOYING), 0 otherwise",
    ["phase"],
    registry=REGISTRY,
)
ROUND_AWAITING_APPROVAL = Gauge(
    "cptd_round_awaiting_approval_since_timestamp_seconds",
    "Unix time the round now waiting for an operator's approval (deploy.mode approve) began to wait; 0 when none waits",
    registry=REGISTRY,
)
ROUND_APPROVALS = Counter(
    "cptd_round_approvals_total",
    "How the rounds that waited for approval ended the wait: approved, rejected (by an operator), timed_out",
    ["decision"],
    registry=REGISTRY,
)
DEPLOY_MODE = Gauge(
    "cptd_deploy_mode", "1 for the policy's deploy.mode (auto, shadow, approve), 0 for the others", ["mode"], registry=REGISTRY
)
ROUND_PHASE_SECONDS = Histogram(
    "cptd_round_phase_seconds",
    "Wall time of each round phase",
    ["phase"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600),
    registry=REGISTRY,
)
ROUND_WEBHOOKS = Counter(
    "cptd_round_webhooks_total",
    "Round-end webhook deliveries (CPTD_ROUND_WEBHOOK_URL) by outcome: sent, or failed after its bounded retries",
    ["outcome"],
    registry=REGISTRY,
)
TRACKING_EXPORTS = Counter(
    "cptd_tracking_exports_total",
    "Ended rounds exported to the experiment tracker (CPTD_MLFLOW_TRACKING_URI) by outcome: exported, or failed (the tracker "
    "down, slow past CPTD_MLFLOW_TIMEOUT_S or refusing; the round stays pending and is tried again)",
    ["outcome"],
    registry=REGISTRY,
)
for _outcome in ("exported", "failed"):
    TRACKING_EXPORTS.labels(_outcome)
TRACKING_PENDING = Gauge(
    "cptd_tracking_pending_rounds", "Ended rounds not yet exported to the experiment tracker (0 when tracking is off)", registry=REGISTRY
)
ROUND_LAST_SUCCESS = Gauge("cptd_round_last_deployed_timestamp_seconds", "Unix time the last round was deployed", registry=REGISTRY)
DRIFT_SCORE = Gauge("cptd_drift_score", "Drift of the latest measured batch against the reference set", ["statistic"], registry=REGISTRY)
CURATION_DOCS = Counter(
    "cptd_curation_docs_total",
    "Candidate documents of curated rounds by what happened to them: chosen, waiting (budget, domain_share, synthetic_cap, "
    "below_threshold, unrated) "
    "or dropped (ppl_low, ppl_high, passed_over)",
    ["action", "reason"],
    registry=REGISTRY,
)
ROUND_SHARE = Gauge(
    "cptd_round_share",
    "Shares of the last round's tokens: kind=provenance (of new tokens: human, unknown, synthetic), kind=real (new + replay), "
    "kind=domain (of new tokens; value: a domain the policy names, unknown, or other)",
    ["kind", "value"],
    registry=REGISTRY,
)
SYNTHETIC_CAP_BINDING_ROUNDS = Gauge(
    "cptd_synthetic_cap_binding_rounds",
    "Rounds in a row in which the synthetic cap left synthetic documents waiting (alert: collapse.cap_alert_rounds)",
    registry=REGISTRY,
)
SYNTHETIC_CAP_ALERT_ROUNDS = Gauge(
    "cptd_synthetic_cap_alert_rounds", "collapse.cap_alert_rounds of the policy in force (the alert's threshold)", registry=REGISTRY
)
RATER_DOCS = Counter(
    "cptd_rater_docs_total",
    "Candidate documents the rater (curation.rater) was asked about, by backend and outcome: rated, or why not "
    "(timeout, invalid_output, out_of_range, request_failed, rater_error, job_failed, not_rated, abandoned, skipped)",
    ["backend", "outcome"],
    registry=REGISTRY,
)
SCORING_DOCS_PER_SECOND = Gauge(
    "cptd_scoring_docs_per_second", "Documents per second the served model scored in the last curated round", registry=REGISTRY
)
REPLAY_RATIO = Gauge("cptd_replay_ratio", "Replay ratio chosen for the current/last round", registry=REGISTRY)

# --- training -------------------------------------------------------------------
TRAIN_LOSS = Gauge("cptd_train_loss", "Training loss at the latest reported step", registry=REGISTRY)
TRAIN_LR = Gauge("cptd_train_learning_rate", "Learning rate at the latest reported step", registry=REGISTRY)
TRAIN_TOKENS_PER_SECOND = Gauge("cptd_train_tokens_per_second", "Useful (non-padding) tokens per second of the trainer", registry=REGISTRY)
TRAIN_STEP = Gauge("cptd_train_step", "Optimizer step of the running round", registry=REGISTRY)
TRAIN_TOKENS = Counter("cptd_train_tokens_total", "Tokens trained on, all rounds", registry=REGISTRY)
EVAL_LOSS = Gauge(
    "cptd_eval_loss", "Held-out loss by split (new, replay) and model (serving, candidate)", ["split", "model"], registry=REGISTRY
)

# --- gates and serving -------------------------------------------------------------
GATE_DECISIONS = Counter(
    "cptd_gate_decisions_total", "Gate decisions, by decision (accept, reject) and first reason", ["decision", "reason"], registry=REGISTRY
)
EVAL_FORGETTING = Gauge(
    "cptd_eval_forgetting_nats", "Candidate minus serving loss on held-out replay (positive = forgetting)", registry=REGISTRY
)
EVAL_ADAPTATION = Gauge(
    "cptd_eval_adaptation_nats", "Serving minus candidate loss on held-out new data (positive = learned)", registry=REGISTRY
)
SWAPS = Counter(
    "cptd_swaps_total", "Weight swaps per replica, by result (ok, failed, rolled_back)", ["replica", "result"], registry=REGISTRY
)
SWAP_PAUSE_SECONDS = Histogram(
    "cptd_swap_pause_seconds",
    "Time a replica held requests during a swap (pause to resume)",
    ["replica"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
    registry=REGISTRY,
)
ROLLBACKS = Counter("cptd_rollbacks_total", "Rollbacks, by trigger (swap_failed, watch, operator)", ["trigger"], registry=REGISTRY)
LIVE_VERSION = Info("cptd_live_weight_version", "Weight version (round id) each replica serves", ["replica"], registry=REGISTRY)
VLLM_REPLICAS = Gauge(
    "cptd_vllm_replicas",
    "vLLM replicas discovered (CPTD_VLLM_URLS, the URLs file, or the addresses CPTD_VLLM_CONTROL_URL resolves to now), by state of their "
    "/health at the last look (ready, unreachable); exported only when vLLM is configured",
    ["state"],
    registry=REGISTRY,
)

# --- control plane -------------------------------------------------------------------
POLICY_INFO = Info("cptd_policy", "Hash of the policy in force", registry=REGISTRY)
POLICY_RELOADS = Counter("cptd_policy_reloads_total", "Policy files accepted by hot-reload", registry=REGISTRY)
POLICY_RELOAD_ERRORS = Counter(
    "cptd_policy_reload_errors_total", "Policy files refused by hot-reload (the old one stays)", registry=REGISTRY
)
LEADER = Gauge("cptd_leader", "1 while this process holds the round-runner lease", registry=REGISTRY)
LEASE_LOST = Counter("cptd_leader_lease_lost_total", "Times this process lost the round-runner lease while holding it", registry=REGISTRY)
UP_SINCE = Gauge("cptd_start_time_seconds", "Unix time this process started", registry=REGISTRY)
REDIS_DATA_LOSS = Gauge(
    "cptd_redis_data_loss",
    "1 while Redis disagrees with the checkpoint volume (identity, round directories, serving state): rounds refused",
    registry=REGISTRY,
)

# --- resources: Redis memory and the checkpoint volume (daemon/resource_gauges.py, every 15 s) ---------------------
# Each reads 0 until the first read: the alerts divide by the `> 0` total, so a daemon that has just started is silent.
REDIS_USED_MEMORY = Gauge(
    "cptd_redis_used_memory_bytes", "Redis INFO memory used_memory: bytes of the dataset and overhead", registry=REGISTRY
)
REDIS_MAXMEMORY = Gauge(
    "cptd_redis_maxmemory_bytes",
    "Redis INFO memory maxmemory: where a noeviction Redis refuses writes (0 = no limit: the kernel OOM-kills it instead)",
    registry=REGISTRY,
)
REDIS_MEMORY_READ_AT = Gauge(
    "cptd_redis_memory_read_timestamp_seconds", "Unix time of the last successful Redis INFO memory read (0 = never)", registry=REGISTRY
)
CHECKPOINT_DISK_FREE = Gauge(
    "cptd_checkpoint_disk_free_bytes", "Bytes free to cptd on the volume of CPTD_CHECKPOINT_DIR (rounds, checkpoints)", registry=REGISTRY
)
CHECKPOINT_DISK_TOTAL = Gauge("cptd_checkpoint_disk_total_bytes", "Size in bytes of the volume of CPTD_CHECKPOINT_DIR", registry=REGISTRY)
