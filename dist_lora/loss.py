"""The causal LM loss, computed in chunks of tokens: never a float32 copy of all the logits.

transformers' ``ForCausalLMLoss`` upcasts the whole ``(tokens, vocab)`` logits to float32 and keeps their log-softmax
for the backward, and the backward makes two more float32 tensors of that size: with a 128k vocabulary, a row of
8192 tokens is 4.2 GB per float32 copy, more than a 70B base's LoRA step needs for anything else. Here the loss and
its gradient are computed a chunk of tokens at a time, each chunk upcast on its own, and the backward writes the
gradient straight into one tensor in the logits' dtype: what stays alive between forward and backward is the
logits themselves (which the model made anyway), and at the peak their gradient and one float32 chunk. The values
are transformers' (the same float32 arithmetic, summed per chunk)."""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


class ChunkedCrossEntropy(torch.autograd.Function):
    """The sum over ``targets`` (ignoring ``ignore_index``) of ``-log softmax(logits)[target]``, float32, computed
    ``chunk`` rows of ``logits`` at a time; saves only the logits (not an upcast copy) for the backward, which
    recomputes each chunk's softmax."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logits: torch.Tensor, targets: torch.Tensor, chunk: int, ignore_index: int
    ) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], chunk):
            log_p = torch.log_softmax(logits[start : start + chunk], dim=1, dtype=torch.float32)  # one float chunk
            t = targets[start : start + chunk]
            picked = log_p.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)
            total -= (picked * (t != ignore_index)).sum()
            del log_p
        ctx.save_for_backward(logits, targets)
        ctx.chunk, ctx.ignore_index = chunk, ignore_index
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        logits, targets = ctx.saved_tensors
        out = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk):
            t = targets[start : start + ctx.chunk]
            kept = (t != ctx.ignore_index).unsqueeze(1)
            p = torch.softmax(logits[start : start + ctx.chunk], dim=1, dtype=torch.float32)
            p.scatter_add_(1, t.clamp(min=0).unsqueeze(1), torch.full_like(p[:, :1], -1.0))
            out[start : start + ctx.chunk] = p.mul_(kept).mul_(grad)
        return out, None, None, None


def chunked_causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | float | None = None,
    ignore_index: int = IGNORE_INDEX,
    shift_labels: torch.Tensor | None = None,
    *,
    chunk_tokens: int,
    **kwargs: Any,
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` (same arguments, same value): tokens ``< n`` predict token ``n``, the
    mean over the targets, or their sum divided by ``num_items_in_batch``; computed ``chunk_tokens`` at a time."""
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    flat = logits.reshape(-1, vocab_size)
    targets = shift_labels.reshape(-1).to(flat.device)
    total = ChunkedCrossEntropy.apply(flat, targets, chunk_tokens, ignore_index)
    if num_items_in_batch is None:
        return total / (targets != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def correct_predictions(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    """How many target tokens the model ranks first (greedy decoding would write them): the argmax of the logits
    at each token ``< n`` against label ``n``, over the targets the loss counts (TRL's mean token accuracy)."""
    predicted = logits[..., :-1, :].argmax(dim=-1)
    targets = labels[..., 1:].to(predicted.device)
    return int(((predicted == targets) & (targets != ignore_index)).sum())


def chunk_the_loss(model: Any, chunk_tokens: int, what: str = "train.loss_chunk_tokens") -> bool:
    """Give ``model`` (a transformers causal LM, before PEFT wraps it) the chunked loss, ``chunk_tokens`` at a time;
    False, leaving it as it is and saying so (on rank 0, naming the setting ``what``), where the model computes its
    loss otherwise than ``ForCausalLMLoss``."""
    import torch.distributed as dist
    from transformers.loss.loss_utils import LOSS_MAPPING

    if model.loss_function is not LOSS_MAPPING["ForCausalLM"]:
        if not dist.is_initialized() or dist.get_rank() == 0:
            log.warning(
                "%s: %s computes its loss with its own function, not transformers' causal LM loss that the chunks "
                "compute; it keeps its own (%s: 0 silences this)",
                what,
                type(model).__name__,
                what,
            )
        return False
    model.loss_function = functools.partial(chunked_causal_lm_loss, chunk_tokens=chunk_tokens)
    return True
