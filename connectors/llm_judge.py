"""An OpenAI-compatible completions endpoint asked to rate documents (the `llm_judge` rater backend).

One `/v1/completions` request per document: the prompt is plain text, so a
model without a chat template (a base model, the tiny test models) can judge
too. With a pattern the request carries vLLM's structured outputs
(`structured_outputs: {"regex": pattern}`; vLLM 0.32 silently ignores the older
`guided_json`), so the answer has the caller's shape. What the
answer means, and what to do with a bad one, is the caller's
(policies/rating.py writes the pattern and parses, daemon/rounds/doc_rating.py decides).
"""

from __future__ import annotations

from typing import Any

import httpx


class JudgeError(RuntimeError):
    """A request that got no answer: `kind` is "timeout" or "failed" (HTTP error, connection refused, bad body)."""

    def __init__(self, url: str, kind: str, message: str):
        super().__init__(f"judge {url}: {kind}: {message}")
        self.kind = kind


def base_url(url: str) -> str:
    """A server's base URL as the rater compares it with the served replicas: no trailing slash or /v1."""
    return url.rstrip("/").removesuffix("/v1").rstrip("/")


class JudgeClient:
    """A thread-safe client of one judge server (httpx clients may be shared across threads)."""

    def __init__(self, url: str, timeout_s: float, verify: bool | str = True):
        self.url = base_url(url)
        self._http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout_s), verify=verify)

    def complete(self, model: str, prompt: str, max_tokens: int, pattern: str | None = None) -> str:
        """The text of one greedy completion; with `pattern`, guided to match it."""
        body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
        if pattern is not None:
            body["structured_outputs"] = {"regex": pattern}
        try:
            r = self._http.post("/v1/completions", json=body)
        except httpx.TimeoutException as e:
            raise JudgeError(self.url, "timeout", type(e).__name__) from None
        except httpx.HTTPError as e:
            raise JudgeError(self.url, "failed", f"{type(e).__name__}: {e}") from None
        if r.status_code != 200:
            raise JudgeError(self.url, "failed", f"HTTP {r.status_code}: {r.text[:300]}")
        try:
            return str(r.json()["choices"][0]["text"])
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise JudgeError(self.url, "failed", f"unexpected body ({type(e).__name__}): {r.text[:300]}") from None

    def close(self) -> None:
        self._http.close()
