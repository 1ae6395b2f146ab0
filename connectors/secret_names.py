"""Which environment variable names hold secrets: one pattern for what a job may inherit from the daemon (a child
process, daemon/job_launchers.py) and what a Kubernetes workload may take from its template (kubernetes_jobs.py).

Its own module so the daemon can use it without importing the Kubernetes client."""

from __future__ import annotations

import re

SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|CREDENTIAL|SASL|(^|_)(TOKEN|KEY|AUTH)(_|$)", re.IGNORECASE)
