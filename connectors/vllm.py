"""The vLLM HTTP client and the checks a checkpoint or adapter must pass before any server sees it.

Thin clients over the HTTP endpoints vLLM 0.32 really exposes (dev mode):
`/pause`, `/collective_rpc`, `/reset_prefix_cache`, `/resume`,
`/update_weight_version`, `/weight_info`, `/weight_checker`, and the LoRA
endpoints, plus `/server_info` to read what a server can take (LoRA flags, dtype)
before the daemon trains for it. Every failure names the replica and the step
(`ServingError`). No decisions are made here (docs/architecture.md §1): when to
swap, roll back or reload is `daemon/serving.py`'s, which drives these clients.

The swap sequence is docs/architecture.md §4; docs/serving.md says why each step is as it is.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
from tenacity import RetryError, Retrying, retry_if_exception_type, retry_if_result, stop_after_attempt, wait_exponential

# --------------------------------------------------------------------------- errors


class ServingError(RuntimeError):
    """A step failed on one replica; the daemon stores replica + step with the round."""

    def __init__(self, replica: str, step: str, message: str):
        super().__init__(f"vLLM replica {replica}: step {step!r} failed: {message}")
        self.replica = replica
        self.step = step
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"replica": self.replica, "step": self.step, "message": self.message}


class CheckpointError(ValueError):
    """A candidate that must not reach a server; carries every problem found, not just the first."""

    def __init__(self, path: str, problems: list[str]):
        super().__init__(f"checkpoint {path} rejected: " + "; ".join(problems))
        self.path = path
        self.problems = problems


# --------------------------------------------------------------------------- what a server answers


@dataclass(frozen=True)
class ServerInfo:
    """What one server was started with, as its `/server_info` reports it (the part the daemon checks)."""

    lora_enabled: bool  # started with --enable-lora
    max_lora_rank: int | None  # --max-lora-rank (None without LoRA)
    max_loras: int | None  # --max-loras (None without LoRA)
    dtype: str | None  # served dtype, e.g. "float32", "bfloat16"
    runtime_lora_updating: bool  # VLLM_ALLOW_RUNTIME_LORA_UPDATING: /v1/load_lora_adapter is mounted
    served_model_name: str | None = None

    @classmethod
    def from_response(cls, body: dict[str, Any]) -> ServerInfo:
        cfg = body.get("vllm_config") or {}
        if not isinstance(cfg, dict):  # config_format=text
            raise ValueError("vllm_config is not JSON (ask with config_format=json)")
        lora = cfg.get("lora_config") or None
        model = cfg.get("model_config") or {}
        dtype = model.get("dtype")
        served = model.get("served_model_name")
        flag = (body.get("vllm_env") or {}).get("VLLM_ALLOW_RUNTIME_LORA_UPDATING")
        return cls(
            lora_enabled=lora is not None,
            max_lora_rank=int(lora["max_lora_rank"]) if lora and lora.get("max_lora_rank") is not None else None,
            max_loras=int(lora["max_loras"]) if lora and lora.get("max_loras") is not None else None,
            # torch.dtype is serialised with str(): "torch.float32"
            dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
            # vLLM reports the parsed env value (a bool); accept the strings it parses as true, too
            runtime_lora_updating=flag is True or str(flag).strip().lower() in ("1", "true"),
            served_model_name=(served[0] if isinstance(served, list) and served else served) or None,
        )


@dataclass(frozen=True)
class DocScore:
    """A document's log-likelihood under the served model: the sum over its scored tokens (all but the first,
    which has no context) and how many there were. `nll` is nats per token; nan for a document with none."""

    logprob_sum: float
    tokens: int

    @property
    def nll(self) -> float:
        return -self.logprob_sum / self.tokens if self.tokens else float("nan")

    @property
    def ppl(self) -> float:
        return math.exp(self.nll) if self.tokens else float("nan")


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ServingConfig:
    """How the daemon talks to its replicas. The client reads the connection fields (timeouts, retries, key, CA);
    the smoke, LoRA and watch fields are the settings `daemon/serving.py` runs the swap and the watch with."""

    timeout_s: float = 30.0
    reload_timeout_s: float = 600.0  # reading a large checkpoint from a volume takes a while
    retries: int = 2  # extra attempts on connection errors / 5xx
    retry_backoff_s: float = 0.5
    smoke_prompt: str = "The"
    smoke_max_tokens: int = 8
    lora_prefix: str = "cptd"
    lora_keep: int = 2  # adapter versions kept loaded (the active one and its predecessor)
    watch_interval_s: float = 1.0
    watch_max_new_errors: int = 0
    api_key: str | None = field(default=None, repr=False)  # vLLM --api-key / VLLM_API_KEY; sent as a bearer token
    # CA bundle for https replica URLs (httpx verify=), else the system CAs; the daemon passes CPTD_VLLM_CA_FILE.
    ca_file: str | None = None


# --------------------------------------------------------------------------- checkpoint validation

_IGNORED_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_commit_hash", "use_cache"}
# What vLLM reads from a model directory only at start-up: a hot swap cannot change it.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


class CheckpointFiles(Protocol):
    """A checkpoint directory as the checks read it: a local one (`LocalFiles`) or one on object storage
    (`connectors.object_store.ObjectFiles`, headers by ranged reads). Only names, small files and headers are read."""

    def name(self) -> str: ...

    def read(self, name: str) -> bytes | None:
        """A small file's bytes (config, tokenizer files); None when absent."""

    def safetensors(self) -> list[str]:
        """The *.safetensors file names directly in the directory, sorted."""

    def header(self, name: str) -> tuple[dict[str, Any], int, int]:
        """(header, header length, file size) of one safetensors file; raises when it cannot be read."""


@dataclass(frozen=True)
class LocalFiles:
    path: Path

    def name(self) -> str:
        return str(self.path)

    def read(self, name: str) -> bytes | None:
        f = self.path / name
        return f.read_bytes() if f.is_file() else None

    def safetensors(self) -> list[str]:
        return [f.name for f in _safetensors_files(self.path)]

    def header(self, name: str) -> tuple[dict[str, Any], int, int]:
        f = self.path / name
        size = f.stat().st_size
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} exceeds file size {size}")
            return json.loads(fh.read(n)), n, size


def files_of(ckpt: str | Path | CheckpointFiles) -> CheckpointFiles:
    return LocalFiles(Path(ckpt)) if isinstance(ckpt, (str, Path)) else ckpt


def tokenizer_differences(candidate: str | Path | CheckpointFiles, reference: str | Path | CheckpointFiles) -> list[str]:
    """Tokenizer files that differ (or exist on one side only). vLLM loads the tokenizer when it starts, so a
    candidate with another tokenizer would be served through the old one: refused, never swapped."""
    cand, ref = files_of(candidate), files_of(reference)
    out = []
    for name in _TOKENIZER_FILES:
        c, r = cand.read(name), ref.read(name)
        if (c is None) != (r is None):
            out.append(f"tokenizer file {name}: {'only in the candidate' if c is not None else 'missing from the candidate'}")
        elif c is not None and r is not None and hashlib.sha256(c).digest() != hashlib.sha256(r).digest():
            out.append(f"tokenizer file {name} differs from the served one")
    return out


def _safetensors_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def tensor_inventory(ckpt: str | Path | CheckpointFiles) -> tuple[dict[str, tuple[tuple[int, ...], str]], list[str]]:
    """name -> (shape, dtype) from safetensors headers only, plus problems (truncation, bad header).

    The byte-length check matters: a partly copied file still has a valid
    header, and vLLM would find out only half-way through loading it. Only the
    header is read (a local file or two ranged reads of an object), so the
    daemon never loads a tensor nor imports torch.
    """
    files = files_of(ckpt)
    inv: dict[str, tuple[tuple[int, ...], str]] = {}
    problems: list[str] = []
    names = files.safetensors()
    if not names:
        problems.append(f"no *.safetensors file in {files.name()}")
    for name in names:
        try:
            header, n, size = files.header(name)
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
            if 8 + n + end != size:
                problems.append(f"{name}: truncated or padded ({size} bytes stored, header describes {8 + n + end})")
                continue
            for k, v in tensors.items():
                inv[k] = (tuple(int(x) for x in v["shape"]), str(v["dtype"]))
        except Exception as e:  # noqa: BLE001 - any unreadable file is a reason to reject
            problems.append(f"{name}: unreadable safetensors ({e})")
    return inv, problems


def validate_checkpoint(candidate: str | Path | CheckpointFiles, reference: str | Path | CheckpointFiles) -> None:
    """Reject a candidate before any server sees it: same config, every tensor, same shapes and dtypes."""
    cand, ref = files_of(candidate), files_of(reference)
    problems: list[str] = []
    try:
        c_raw, r_raw = cand.read("config.json"), ref.read("config.json")
        if c_raw is None or r_raw is None:
            raise OSError(f"no config.json in {(cand if c_raw is None else ref).name()}")
        c_cfg, r_cfg = json.loads(c_raw), json.loads(r_raw)
        keys = (set(c_cfg) | set(r_cfg)) - _IGNORED_CONFIG_KEYS
        for k in sorted(keys):
            if c_cfg.get(k) != r_cfg.get(k):
                problems.append(f"config.json {k}: {c_cfg.get(k)!r} != served {r_cfg.get(k)!r}")
    except (OSError, ValueError) as e:
        problems.append(f"config.json unreadable: {e}")
    vocab = tokenizer_differences(cand, ref)
    if vocab:
        problems += vocab + [
            "a new tokenizer or vocabulary cannot be hot-swapped (vLLM loads the tokenizer at start-up and reload_weights "
            "needs the same shapes): deploy it as a new model, not as a round of this one"
        ]
    c_inv, c_probs = tensor_inventory(cand)
    r_inv, r_probs = tensor_inventory(ref)
    problems += c_probs
    if r_probs:
        problems += [f"reference {p}" for p in r_probs]
    if not c_probs and not r_probs:
        for name in sorted(set(r_inv) - set(c_inv)):
            problems.append(f"missing tensor {name}")
        for name in sorted(set(c_inv) - set(r_inv)):
            problems.append(f"unexpected tensor {name}")
        for name in sorted(set(c_inv) & set(r_inv)):
            if c_inv[name] != r_inv[name]:
                problems.append(f"tensor {name}: shape/dtype {c_inv[name]} != served {r_inv[name]}")
    if problems:
        raise CheckpointError(cand.name(), problems)


def validate_lora_adapter(adapter: str | Path, max_rank: int | None = None) -> None:
    d = Path(adapter)
    problems: list[str] = []
    try:
        cfg = json.loads((d / "adapter_config.json").read_text())
        if max_rank is not None and int(cfg.get("r", 0)) > max_rank:
            problems.append(f"adapter rank {cfg.get('r')} > server max_lora_rank {max_rank}")
    except (OSError, ValueError) as e:
        problems.append(f"adapter_config.json unreadable: {e}")
    inv, probs = tensor_inventory(d)
    problems += probs
    if not probs and not inv:
        problems.append("adapter has no tensors")
    if problems:
        raise CheckpointError(str(d), problems)


# --------------------------------------------------------------------------- one replica

_RETRYABLE = (httpx.TransportError,)


def _http_error(r: httpx.Response, method: str, path: str) -> str:
    return f"HTTP {r.status_code} from {method} {path}: {r.text[:500]}"


class Replica:
    """Thin client for one vLLM server; every failure names this replica and the step."""

    def __init__(self, url: str, config: ServingConfig = ServingConfig()):
        self.url = url.rstrip("/")
        self.config = config
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else None
        verify = ssl.create_default_context(cafile=config.ca_file) if config.ca_file else True
        self._http = httpx.Client(base_url=self.url, timeout=config.timeout_s, headers=headers, verify=verify)
        self._model: str | None = None

    def close(self) -> None:
        self._http.close()

    def call(
        self,
        step: str,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: dict | None = None,
        timeout: float | None = None,
        retries: int | None = None,
    ) -> httpx.Response:
        """One request; connection errors and 5xx are retried (`retries` extra attempts, exponential back-off)."""
        attempts = 1 + (self.config.retries if retries is None else retries)
        retrying = Retrying(
            stop=stop_after_attempt(attempts),
            wait=wait_exponential(multiplier=self.config.retry_backoff_s),  # backoff * 2**i before attempt i + 2
            retry=retry_if_exception_type(_RETRYABLE) | retry_if_result(lambda r: r.status_code >= 500),
        )
        try:
            r = retrying(self._http.request, method, path, json=json_body, params=params, timeout=timeout or self.config.timeout_s)
        except RetryError as e:
            exc = e.last_attempt.exception()
            last = f"{type(exc).__name__}: {exc}" if exc is not None else _http_error(e.last_attempt.result(), method, path)
            raise ServingError(self.url, step, f"{last} (after {attempts} attempt(s))") from None
        if r.status_code >= 400:
            raise ServingError(self.url, step, _http_error(r, method, path))
        return r

    # --- endpoints -----------------------------------------------------------
    def health(self) -> bool:
        try:
            return self._http.get("/health", timeout=5.0).status_code == 200
        except httpx.HTTPError:
            return False

    def model_name(self) -> str:
        if self._model is None:
            data = self.call("models", "GET", "/v1/models").json()["data"]
            base = [m for m in data if not m.get("parent")]
            self._model = (base or data)[0]["id"]
        return self._model

    def models(self) -> list[dict]:
        return self.call("models", "GET", "/v1/models").json()["data"]

    def model_ids(self) -> list[str]:
        return [m["id"] for m in self.models()]

    def pause(self) -> None:
        self.call("pause", "POST", "/pause", params={"mode": "keep"})

    def resume(self) -> None:
        self.call("resume", "POST", "/resume")

    def is_paused(self) -> bool:
        return bool(self.call("is_paused", "GET", "/is_paused").json().get("is_paused"))

    def reload_weights(self, weights_path: str) -> None:
        r = self.call(
            "reload_weights",
            "POST",
            "/collective_rpc",
            json_body={"method": "reload_weights", "kwargs": {"weights_path": weights_path}},
            timeout=self.config.reload_timeout_s,
        )
        if r.content:
            body = r.json()
            if isinstance(body, dict) and body.get("error"):
                raise ServingError(self.url, "reload_weights", str(body["error"]))

    def reset_prefix_cache(self) -> None:
        # Requests frozen by pause(keep) hold KV blocks computed with the old weights; preempting
        # them makes the reset succeed and makes them recompute with the new weights on resume.
        r = self.call("reset_prefix_cache", "POST", "/reset_prefix_cache", params={"reset_running_requests": "true"})
        if r.content and r.json().get("success") is False:
            raise ServingError(self.url, "reset_prefix_cache", "server reported success=false")

    def set_weight_version(self, version: str) -> None:
        self.call("update_weight_version", "POST", "/update_weight_version", json_body={"new_version": version})

    def weight_version(self) -> str:
        return str(self.call("weight_info", "GET", "/weight_info").json()["weight_version"])

    def checksums(self) -> dict[str, str]:
        return dict(self.call("weight_checker", "POST", "/weight_checker", json_body={"action": "checksum"}).json()["checksums"])

    def fingerprint(self) -> str:
        return fingerprint_of(self.checksums())

    def complete(self, prompt: str, max_tokens: int, model: str | None = None, step: str = "smoke") -> str:
        r = self.call(
            step,
            "POST",
            "/v1/completions",
            json_body={
                "model": model or self.model_name(),
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0.0,
                "seed": 0,
            },
        )
        choices = r.json().get("choices") or []
        if not choices:
            raise ServingError(self.url, step, f"completion without choices: {r.text[:300]}")
        return str(choices[0].get("text", ""))

    def metrics_text(self) -> str:
        return self.call("metrics", "GET", "/metrics").text

    def server_info(self) -> ServerInfo:
        """The server's LoRA flags and dtype from `GET /server_info?config_format=json` (dev mode only).

        The answer (~25 KB) also carries `system_env` from vLLM's collect_env,
        computed on the first request and cached by the server: the first call
        after a start took ~1.5 s on the 2-core dev VM (subprocesses such as pip
        list; longer on a busy GPU host), later ones ~25 ms. Hence the longer
        timeout; call it before a round, not on a hot path.
        """
        r = self.call("server_info", "GET", "/server_info", params={"config_format": "json"}, timeout=max(self.config.timeout_s, 120.0))
        try:
            return ServerInfo.from_response(r.json())
        except (ValueError, TypeError, KeyError) as e:
            raise ServingError(self.url, "server_info", f"unexpected /server_info answer: {e!r}") from None

    def max_model_len(self, model: str | None = None) -> int | None:
        """The context length `/v1/models` reports for `model` (default: the base model); None if it reports none."""
        name = model or self.model_name()
        for m in self.models():
            if m.get("id") == name and m.get("max_model_len") is not None:
                return int(m["max_model_len"])
        return None

    def prompt_logprobs(
        self, texts: list[str], model: str | None = None, max_tokens_per_doc: int | None = None, *, batch_size: int = 32
    ) -> list[DocScore]:
        """Each document's log-likelihood under the served model, from `/v1/completions` with `echo` and `logprobs`.

        Up to `batch_size` documents go in one request (the completions API takes a list of prompts). A document
        is cut to its first `max_tokens_per_doc` tokens, and always to the server's `max_model_len` - 1 (one
        position is held for the token the request must generate), by the server (`truncate_prompt_tokens`,
        `truncation_side: right`), so nothing is rejected for its length. The first token has no logprob and is
        not counted; an empty document scores `DocScore(0.0, 0)` and is not sent.
        """
        if max_tokens_per_doc is not None and max_tokens_per_doc < 2:
            raise ValueError(f"max_tokens_per_doc must be >= 2 (the first token is not scored), got {max_tokens_per_doc}")
        name = model or self.model_name()
        server_len = self.max_model_len(name)
        limits = [n for n in (max_tokens_per_doc, server_len - 1 if server_len else None) if n is not None]
        truncate = min(limits) if limits else -1  # -1: the server's own limit (max_model_len - max_tokens)
        out: list[DocScore] = [DocScore(0.0, 0)] * len(texts)
        todo = [i for i, t in enumerate(texts) if t]
        for start in range(0, len(todo), batch_size):
            idx = todo[start : start + batch_size]
            step = f"prompt_logprobs (docs {start + 1}-{start + len(idx)} of {len(todo)})"
            r = self.call(
                step,
                "POST",
                "/v1/completions",
                json_body={
                    "model": name,
                    "prompt": [texts[i] for i in idx],
                    "echo": True,
                    "logprobs": 0,
                    "max_tokens": 1,
                    "temperature": 0.0,
                    "truncate_prompt_tokens": truncate,
                    "truncation_side": "right",
                },
                timeout=max(self.config.timeout_s, 300.0),
            )
            try:
                choices = sorted(r.json()["choices"], key=lambda c: c["index"])
                if len(choices) != len(idx):
                    raise ValueError(f"{len(choices)} choices for {len(idx)} prompts")
                for i, c in zip(idx, choices, strict=True):
                    # echo: the (truncated) prompt's tokens, then the generated one; `prompt_logprobs` has one
                    # entry per prompt token. The first prompt token has None.
                    lps = c["logprobs"]["token_logprobs"]
                    n_prompt = len(c["prompt_logprobs"]) if c.get("prompt_logprobs") is not None else len(lps) - 1
                    lps = lps[:n_prompt]
                    scored = [float(x) for x in lps[1:] if x is not None]
                    out[i] = DocScore(math.fsum(scored), len(scored))
            except (ValueError, TypeError, KeyError) as e:
                raise ServingError(self.url, step, f"unexpected /v1/completions answer: {e!r}: {r.text[:300]}") from None
        return out

    def prompt_logprobs_refusal(self) -> str | None:
        """Why `prompt_logprobs` must not be asked of this replica; None when it may. vLLM 0.32's engine dies on a
        prompt-logprobs request when started with --enable-lora (vllm#29955, seen on the CPU build:
        tests/test_doc_scoring.py): asking would take the replica down. ServingError when /server_info fails."""
        if self.server_info().lora_enabled:
            return f"replica {self.url} runs with --enable-lora, where prompt logprobs crash vLLM 0.32 (vllm#29955)"
        return None

    def tokenize(self, text: str, model: str | None = None) -> list[int]:
        """The token ids of the whole of `text` under the served tokenizer (`POST /tokenize`), no special tokens."""
        body = {"model": model or self.model_name(), "prompt": text, "add_special_tokens": False}
        r = self.call("tokenize", "POST", "/tokenize", json_body=body)
        try:
            return [int(t) for t in r.json()["tokens"]]
        except (ValueError, TypeError, KeyError) as e:
            raise ServingError(self.url, "tokenize", f"unexpected /tokenize answer: {e!r}: {r.text[:300]}") from None

    def load_lora(self, name: str, path: str) -> None:
        self.call("load_lora_adapter", "POST", "/v1/load_lora_adapter", json_body={"lora_name": name, "lora_path": path})

    def unload_lora(self, name: str) -> None:
        self.call("unload_lora_adapter", "POST", "/v1/unload_lora_adapter", json_body={"lora_name": name})


def fingerprint_of(checksums: dict[str, str]) -> str:
    """One hash over the per-tensor checksums; the worker-rank prefix is dropped so replicas compare."""
    # With --enable-lora vLLM wraps layers and names their weights "...base_layer..."; strip that too.
    items = sorted((k.split(":")[-1].replace(".base_layer", ""), v) for k, v in checksums.items())
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


_SERVER_ERROR_RE = re.compile(r"^http_requests_total\{([^}]*)\}\s+([0-9.eE+-]+)", re.M)
_INFERENCE_HANDLERS = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages")


def request_errors(metrics_text: str) -> int:
    """Failed inference requests so far: 5xx answers on the inference routes (prometheus-fastapi-instrumentator)."""
    total = 0.0
    for labels, value in _SERVER_ERROR_RE.findall(metrics_text):
        lab = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if lab.get("status", "").startswith("5") and lab.get("handler") in _INFERENCE_HANDLERS:
            total += float(value)
    return int(total)
