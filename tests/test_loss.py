"""The chunked causal LM loss: transformers' values and gradients, without a float32 copy of all the logits."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from dist_lora.loss import ChunkedCrossEntropy, chunk_the_loss, chunked_causal_lm_loss
from dist_lora.model import load_base

VOCAB = 1000


def logits_and_labels(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    logits = (torch.randn(3, 50, VOCAB) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, VOCAB, (3, 50))
    labels[:, :7] = -100  # a prompt
    labels[1, 30:] = -100  # padding
    labels[2] = -100  # a row without targets (a rank's filler batch)
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_items", [None, 37.0, torch.tensor(37.0)])
@pytest.mark.parametrize("chunk", [1, 16, 150, 10_000])
def test_the_chunks_give_transformers_loss_and_gradient(dtype, num_items, chunk):
    """Any chunk size (one token, uneven, all at once), the mean or a sum over a given count, a float32 or bfloat16
    model: the loss within 1e-5 and the gradient of the logits (in their dtype) as transformers computes them."""
    logits, labels = logits_and_labels(dtype)
    want = ForCausalLMLoss(logits, labels, VOCAB, num_items_in_batch=num_items)
    (want_grad,) = torch.autograd.grad(want, logits)
    got = chunked_causal_lm_loss(logits, labels, VOCAB, num_items_in_batch=num_items, chunk_tokens=chunk)
    (got_grad,) = torch.autograd.grad(got, logits)
    assert got.dtype == want.dtype == torch.float32
    assert abs(got.item() - want.item()) <= 1e-5 * want.item()
    assert got_grad.dtype == dtype
    tolerance = 1e-7 if dtype == torch.float32 else 1e-6  # bfloat16: the same rounding of the same float32 values
    assert (got_grad.float() - want_grad.float()).abs().max().item() <= tolerance
    assert got_grad[2].abs().max() == 0 and got_grad[1, 30:].abs().max() == 0  # no target, no gradient


def test_shifted_labels_given_are_used_as_they_are():
    logits, labels = logits_and_labels(torch.float32)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    want = ForCausalLMLoss(logits, None, VOCAB, shift_labels=shifted)
    got = chunked_causal_lm_loss(logits, None, VOCAB, shift_labels=shifted, chunk_tokens=16)
    assert abs(got.item() - want.item()) <= 1e-6 * want.item()


def test_the_backward_scales_by_the_incoming_gradient():
    """Backward multiplies by the loss's own gradient (a loss divided by accumulation steps, scaled by an AMP
    scaler): against autograd through log_softmax in float32."""
    torch.manual_seed(1)
    x = torch.randn(20, 7, requires_grad=True)
    t = torch.randint(0, 7, (20,))
    t[3] = -100
    (got,) = torch.autograd.grad(ChunkedCrossEntropy.apply(x, t, 6, -100) * 0.25, x)
    want_loss = torch.nn.functional.cross_entropy(x, t, ignore_index=-100, reduction="sum") * 0.25
    (want,) = torch.autograd.grad(want_loss, x)
    assert (got - want).abs().max().item() <= 1e-7


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_model_given_the_chunks_trains_as_with_its_own_loss(arch, gpt2_base, llama_base):
    """The model's loss and every gradient of one backward equal those of its own loss; a model whose loss is its
    own function is left with it (chunk_the_loss says so, and the trainer warns)."""
    base = {"gpt2": gpt2_base, "llama": llama_base}[arch]
    own, chunked = load_base(str(base), torch.float32), load_base(str(base), torch.float32)
    assert chunk_the_loss(chunked, 8)
    ids = torch.randint(0, own.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :5] = -100
    results = []
    for model in (own, chunked):
        loss = model(input_ids=ids, labels=labels, num_items_in_batch=30.0).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}))
    (a, grads_a), (b, grads_b) = results
    assert abs(a - b) <= 1e-6 * abs(a)
    assert max((grads_a[n] - grads_b[n]).abs().max().item() for n in grads_a) <= 1e-6

    custom = load_base(str(base), torch.float32)
    custom.loss_function = lambda logits, labels, **kwargs: logits.sum()
    assert not chunk_the_loss(custom, 8)
    assert custom.loss_function.__name__ == "<lambda>"


def test_the_trainer_warns_where_a_model_keeps_its_own_loss(gpt2_base, tmp_path, monkeypatch, caplog):
    from transformers import GPT2LMHeadModel

    from dist_lora import train as train_module
    from dist_lora.config import load_config
    from dist_lora.demo import corpus_path
    from tests.dist_utils import TINY

    monkeypatch.setattr(GPT2LMHeadModel, "loss_function", property(lambda self: lambda **kwargs: None))
    overrides = [
        f"model.name_or_path={gpt2_base}",
        f"data.path={corpus_path()}",
        f"checkpoint.dir={tmp_path}",
        "parallel.backend=single",  # no process group left in this process (the multi-rank tests fork it)
    ]
    with caplog.at_level(logging.WARNING, logger="dist_lora"):
        trainer = train_module.Trainer(load_config(TINY, overrides))
        trainer.close()
        trainer.checkpointer.release_lease()
    assert "train.loss_chunk_tokens: GPT2LMHeadModel computes its loss with its own function" in caplog.text
