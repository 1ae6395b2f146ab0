"""Packed micro-batches attend only within their documents, and the chunked loss is the unchunked one.

A random 2-layer Llama in fp32 on CPU, built from a config (no files): each test takes well under a second.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

from daemon.jobs.lm_loss import IGNORE, token_nll
from daemon.jobs.token_blocks import pack
from daemon.jobs.trainer import micro_batch_loss, packed_inputs

CONFIG = {
    "vocab_size": 97,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
BOS, EOS = 1, 2


def tiny(attn: str, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(LlamaConfig(**CONFIG, tie_word_embeddings=tie), attn_implementation=attn)
    model.config.use_cache = False
    return model


def documents(n: int) -> list[list[int]]:
    r = random.Random(0)
    return [[BOS] + [r.randrange(3, CONFIG["vocab_size"]) for _ in range(r.randint(3, 40))] + [EOS] for _ in range(n)]


def packed_and_separate(model, micro_batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed loss, separate loss, packed per-token NLL, separate per-token NLL): each document piece of each
    packed row scored on its own, as a one-row batch with positions from 0."""
    ids, pos, tgt = pack(documents(60), 32, BOS)
    x, p, y = ids[:micro_batch], pos[:micro_batch], tgt[:micro_batch]
    nxt = torch.cat([y[:, 1:], torch.full_like(y[:, :1], IGNORE)], dim=1)
    with torch.no_grad():
        packed = micro_batch_loss(model, x, p, y)
        packed_tok = token_nll(model, nxt, **packed_inputs(model, x, p))  # the same forward, token by token
        separate_tok = torch.zeros_like(packed_tok)
        for row in range(micro_batch):
            starts = (p[row] == 0).nonzero().flatten().tolist() + [p.shape[1]]
            for a, b in zip(starts[:-1], starts[1:], strict=True):
                piece = nxt[row : row + 1, a:b].clone()
                piece[0, -1] = IGNORE  # the piece's last token predicts the next document's BOS, masked anyway
                separate_tok[row, a:b] = token_nll(model, piece, input_ids=x[row : row + 1, a:b])
    separate = separate_tok.sum()
    return packed, separate, packed_tok, separate_tok


@pytest.mark.parametrize("micro_batch", [1, 8])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_is_the_sum_of_the_documents_losses(attn, micro_batch):
    packed, separate, packed_tok, separate_tok = packed_and_separate(tiny(attn), micro_batch)
    assert separate > 0 and (packed_tok != 0).sum() > micro_batch * 20  # a real loss over many tokens
    print(
        f"{attn} mb={micro_batch}: max token diff {float((packed_tok - separate_tok).abs().max()):.2e}, "
        f"sum {float(packed):.6f} vs {float(separate):.6f}"
    )
    assert float((packed_tok - separate_tok).abs().max()) <= 1e-5
    assert abs(float(packed - separate)) <= 1e-5 * float(separate)


def varlen_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """flash-attention's contract on CPU, as transformers' _flash_attention_forward dispatches it: the explicit
    cumulative lengths when given, else lengths read from position_ids at batch size 1 only, else one causal
    attention over each whole row. Each sequence is plain causal sdpa."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

    b, h, n, d = query.shape
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None and _is_packed_sequence(kwargs.get("position_ids"), b):
        (cu, _), _ = prepare_fa_kwargs_from_position_ids(kwargs["position_ids"])
    if cu is None:
        cu = torch.arange(0, b * n + 1, n)
    q, k, v = (t.transpose(1, 2).reshape(b * n, -1, d).transpose(0, 1) for t in (query, key, value))
    k, v = (t.repeat_interleave(h // t.shape[0], dim=0) for t in (k, v))
    out = torch.cat(
        [
            F.scaled_dot_product_attention(q[:, s:e], k[:, s:e], v[:, s:e], is_causal=True, scale=scaling)
            for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)
        ],
        dim=1,
    )
    return out.transpose(0, 1).reshape(b, n, h, d), None


@pytest.mark.parametrize("micro_batch", [1, 8])
def test_flash_attention_path_gets_each_documents_length(micro_batch):
    """The trainer's flash-attention inputs, through a CPU stand-in for the varlen kernel."""
    AttentionInterface.register("flash_varlen_reference", varlen_reference)
    model = tiny("sdpa")
    model.config._attn_implementation = "flash_varlen_reference"  # no mask is built for it, as for flash
    packed, separate, packed_tok, separate_tok = packed_and_separate(model, micro_batch)
    print(f"flash path mb={micro_batch}: max token diff {float((packed_tok - separate_tok).abs().max()):.2e}")
    assert float((packed_tok - separate_tok).abs().max()) <= 1e-5
    assert abs(float(packed - separate)) <= 1e-5 * float(separate)


def with_head(kind: str) -> torch.nn.Module:
    """A tiny model whose output projection is a plain Linear, the input embedding (tied), or a LoRA layer."""
    if kind != "lora":
        return tiny("sdpa", tie=kind == "tied")
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    return get_peft_model(tiny("sdpa"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False))


@pytest.mark.parametrize("head", ["linear", "tied", "lora"])
def test_chunked_loss_and_gradients_equal_the_whole_vocabulary_loss(head):
    """token_nll over chunks of 7 positions (a plain head: its own backward, one weight gradient buffer; a LoRA
    head: checkpointed chunks of its forward) against cross-entropy over the whole micro-batch's logits: the same
    loss and the same gradients."""
    ids, pos, tgt = pack(documents(60), 32, BOS)
    x, p, y = ids[:4], pos[:4], tgt[:4]
    nxt = torch.cat([y[:, 1:], torch.full_like(y[:, :1], IGNORE)], dim=1)
    chunked_model, whole_model = with_head(head), with_head(head)
    whole_model.load_state_dict(chunked_model.state_dict())
    chunked = token_nll(chunked_model, nxt, chunk_tokens=7, **packed_inputs(chunked_model, x, p)).sum()
    logits = whole_model(**packed_inputs(whole_model, x, p)).logits
    whole = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), nxt.reshape(-1), ignore_index=IGNORE, reduction="sum")
    (chunked / 100).backward()
    (whole / 100).backward()
    assert abs(chunked.item() - whole.item()) <= 1e-5 * whole.item()
    grads = {n: q.grad for n, q in whole_model.named_parameters()}
    trained = [(n, q) for n, q in chunked_model.named_parameters() if q.requires_grad]
    assert trained and all(q.grad is not None for _, q in trained)
    for n, q in trained:
        torch.testing.assert_close(q.grad, grads[n], rtol=1e-5, atol=1e-6, msg=n)
    out = chunked_model.get_output_embeddings()
    assert out._cptd_next_tokens is None  # the projection is itself again after the loss
    torch.testing.assert_close(chunked_model(input_ids=x).logits, whole_model(input_ids=x).logits)
