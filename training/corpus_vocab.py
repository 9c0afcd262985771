"""Train with the softmax over the corpus's own tokens (`finetune --corpus-vocab`).

Gemma 3 has a 262,144-token vocabulary: at 4x512 tokens a step its LM head writes a 2 GB
logits tensor (and as much again for its gradient), most of a CPU step's time. The
transcripts use a few tens of thousands of those tokens. While training, the head here
computes logits for those alone (the rows of its weight the corpus uses), and the loss is
the cross-entropy over them: the other tokens' logits are never computed, so the model is
not taught to push them down (a sampled-softmax shortcut). Evaluation keeps the whole head
(`module.training` is False there), so val loss and BPB stay the honest full-vocabulary
numbers that show whether the shortcut cost anything, and the saved weights are the
model's own: nothing of this is exported.

transformers' Trainer has the hooks this needs: `compute_loss_func` (the loss from the
model's outputs and the labels, normalised by `num_items_in_batch` across gradient
accumulation) and the head's forward; the state dict is untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

IGNORE = -100


def corpus_token_ids(blocks: Iterable[Iterable[int]], tokenizer) -> torch.Tensor:
    """The sorted token ids the blocks use, with the tokenizer's special tokens."""
    ids: set[int] = set()
    for block in blocks:
        ids.update(block)
    ids.update(i for i in tokenizer.all_special_ids if i is not None and i >= 0)
    return torch.tensor(sorted(ids), dtype=torch.long)


def restrict_head(model, keep: torch.Tensor) -> None:
    """While the model trains, its output head computes the logits of `keep` only (in that
    order); in eval mode it is the whole head, as before."""
    head = model.get_output_embeddings()
    full = head.forward

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        if not head.training:
            return full(hidden)
        index = keep.to(head.weight.device)
        bias = None if head.bias is None else head.bias.index_select(0, index)
        return F.linear(hidden, head.weight.index_select(0, index), bias)

    head.forward = forward  # an instance attribute: the module and its weights stay as they are


def causal_lm_loss(keep: torch.Tensor, vocab_size: int) -> Callable:
    """Trainer's compute_loss_func: next-token cross-entropy from outputs.logits, over
    `keep` when the logits are the restricted ones (training), over the whole vocabulary
    otherwise (evaluation); summed and divided by num_items_in_batch when Trainer gives it
    (gradient accumulation), else the mean."""
    remap = torch.full((vocab_size,), IGNORE, dtype=torch.long)
    remap[keep] = torch.arange(len(keep))

    def loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        targets = labels[..., 1:]
        if logits.shape[-1] == len(keep) != vocab_size:
            valid = targets != IGNORE
            targets = torch.where(valid, remap.to(targets.device)[targets.clamp(min=0)], IGNORE)
        flat = logits[..., :-1, :].reshape(-1, logits.shape[-1]).float()
        total = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE, reduction="sum")
        if num_items_in_batch is None:
            return total / (targets != IGNORE).sum().clamp(min=1)
        return total / num_items_in_batch

    return loss
