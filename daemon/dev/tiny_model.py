"""Build a tiny Llama and its tokenizer locally, for tests, benches and the demo.

No model hub is reachable where cptd is developed and tested, so every model we
need is made here: a byte-level BPE tokenizer trained with `tokenizers` on the
given texts, and a randomly initialised LlamaForCausalLM saved as safetensors —
the same directory layout a real Hugging Face checkpoint has, which is what the
trainer and vLLM load.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


@dataclass(frozen=True)
class TinyLlamaShape:
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 2  # head_dim 64: a size every vLLM attention backend supports
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with <s>, </s>, <unk>, <pad>, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_llama(
    out_dir: str | Path, texts: Iterable[str], shape: TinyLlamaShape = TinyLlamaShape(), seed: int = 0, dtype: str = "float32"
) -> Path:
    """Write tokenizer + config + model.safetensors to out_dir and return it; dtype "bfloat16" or "float16"
    gives a checkpoint stored like the ones people serve (config.json `dtype` and every tensor)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(texts, shape.vocab_size, out)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.config.dtype = getattr(torch, dtype)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def cast_checkpoint(src: str | Path, dst: str | Path, dtype: str) -> Path:
    """A copy of a checkpoint stored in another dtype (a bf16 or fp16 twin of an fp32 model)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "config.json", "vllm-*.log"))
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=getattr(torch, dtype))
    model.config.dtype = getattr(torch, dtype)
    model.save_pretrained(str(dst), safe_serialization=True)
    return dst
