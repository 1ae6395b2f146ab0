"""The one way a torch job loads a model: training, evaluation and the drift probe all come through here.

Why one loader: the first version had three, and they disagreed. The trainer
upcast a bf16 parent to fp32 and wrote an fp32 candidate that vLLM's bf16
replicas refused; evaluation scored in fp32 on CPU whatever the hardware; none
refused a pickled checkpoint. Here every load:

- reads safetensors only (a checkpoint or adapter written by anyone is never unpickled);
- defaults to the checkpoint's own dtype (config.json `dtype`), which is what vLLM
  serves with `--dtype auto`, so a gate scores what clients will get;
- lands on the device the caller names ("auto" = CUDA when present, else CPU);
- can put a LoRA adapter on top (scored, or trainable for a resumed round), or load
  the base in 4-bit NF4 through bitsandbytes (QLoRA), refusing with the cause when
  bitsandbytes cannot run 4-bit on that device.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from typing import TypeAlias

    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase
    from transformers.models.auto.modeling_auto import _BaseModelWithGenerate

    # What load_causal_lm returns: what AutoModelForCausalLM.from_pretrained gives (transformers' own name for a
    # PreTrainedModel with GenerationMixin), or peft's wrapper around one (an adapter on top).
    CausalLM: TypeAlias = _BaseModelWithGenerate | PeftModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """A checkpoint we will not load, with the reason (no safetensors, unknown dtype, no 4-bit support)."""


def resolve_device(want: str = "auto") -> torch.device:
    """ "auto" = CUDA when present (this rank's GPU under torchrun), else CPU."""
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError("device 'cuda' requested but torch sees no CUDA device")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(want)


def checkpoint_dtype(path: str | Path) -> torch.dtype:
    """The dtype a checkpoint is stored and served in: config.json `dtype` (transformers >= 4.56) or `torch_dtype`."""
    cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    if name not in DTYPES:
        raise ModelLoadError(f"{path}/config.json: dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def require_safetensors(path: str | Path) -> None:
    d = Path(path)
    if is_adapter(d):
        if not (d / "adapter_model.safetensors").exists():
            raise ModelLoadError(f"{d}: adapter without adapter_model.safetensors; pickled adapters are not loaded")
    elif not any(d.glob("*.safetensors")):
        found = sorted(p.name for p in d.glob("*.bin")) or sorted(p.name for p in d.iterdir())[:5]
        raise ModelLoadError(f"{d}: no *.safetensors weights (found {found}); pickled checkpoints are not loaded")


def four_bit_refusal(device: torch.device) -> str | None:
    """Why 4-bit NF4 (QLoRA) cannot run on `device`, or None when it can: a real Linear4bit forward decides."""
    try:
        import bitsandbytes as bnb
    except Exception as e:  # noqa: BLE001 - a broken install is as much a reason as a missing one
        return f"bitsandbytes is not importable ({type(e).__name__}: {e}); install the 'train' extra"
    try:
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").to(device)
        with torch.no_grad():
            out = layer(torch.ones(1, 64, dtype=torch.bfloat16, device=device))
        if not torch.isfinite(out).all():
            return f"bitsandbytes {bnb.__version__} 4-bit forward on {device} gives non-finite values"
    except Exception as e:  # noqa: BLE001
        return f"bitsandbytes {bnb.__version__} cannot run 4-bit NF4 on {device}: {type(e).__name__}: {e}"
    return None


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load_causal_lm(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    adapter: str | Path | None = None,
    trainable_adapter: bool = False,
    quantize: str | None = None,
    attn_implementation: str | None = None,
) -> CausalLM:
    """A causal LM from a safetensors checkpoint, in `dtype` (default: the checkpoint's) on `device`.

    adapter: a LoRA adapter dir put on top (PeftModel), trainable when resuming a round.
    quantize="nf4": the base in 4-bit NF4 with bf16 compute (QLoRA); refused with the cause when unsupported.
    Returned in eval mode unless an adapter is trainable.
    """
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device) if isinstance(device, str) else device
    require_safetensors(path)
    if adapter is not None:
        require_safetensors(adapter)
    kw: dict[str, Any] = {"use_safetensors": True}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    if quantize is not None:
        if quantize != "nf4":
            raise ModelLoadError(f"quantization {quantize!r} is not supported (only 'nf4')")
        why = four_bit_refusal(dev)
        if why:
            raise ModelLoadError(why)
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=False
        )
        kw["device_map"] = {"": dev}
        model: CausalLM = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.bfloat16, **kw)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or checkpoint_dtype(path), **kw)
        # transformers types its `to` override as @wraps(nn.Module.to), which mypy reads as unbound (self not filled in).
        model = model.to(dev)  # type: ignore[arg-type]
    if adapter is not None:
        from peft import PeftModel

        # Trainable: peft upcasts the adapter to fp32 (master weights). Scored: it stays in the dtype it was saved in.
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable_adapter, autocast_adapter_dtype=trainable_adapter)
        if not trainable_adapter:
            model = model.to(dev)
    if not trainable_adapter:
        model.eval()
    return model
