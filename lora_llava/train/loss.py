"""The answer-only loss: next-token cross-entropy on the supervised positions, with the LM head run on those only."""

from __future__ import annotations

import torch

__all__ = ["answer_only_loss"]


def answer_only_loss(model, inputs: dict, num_items_in_batch=None):
    """Next-token cross-entropy computed on the supervised positions only.

    The LM head runs only on the positions whose next token is a target (a boolean ``logits_to_keep``), so the full
    (batch x length x 32k) logits are never built: on LLaVA's prompts most positions are image and prompt tokens.
    (TRL's fused head does this with a Triton kernel on GPU but scores every position elsewhere, 3x slower on CPU.)
    The call goes through ``model`` itself, so a DDP / DeepSpeed / FSDP wrapper sees the forward pass.
    Returns (loss, a small output object with the loss and the number of target tokens).
    """
    labels = inputs["labels"]
    kwargs = {k: v for k, v in inputs.items() if k != "labels"}
    targets = labels[:, 1:]
    mask = targets != -100
    # Position i is scored when the token at i + 1 is a target; a boolean mask gives the logits of those rows only.
    keep = torch.nn.functional.pad(mask, (0, 1), value=False)
    logits = model(**kwargs, use_cache=False, logits_to_keep=keep).logits
    loss = torch.nn.functional.cross_entropy(logits.float(), targets[mask], reduction="sum")
    n = num_items_in_batch if num_items_in_batch is not None else mask.sum()
    loss = loss / torch.as_tensor(n, device=loss.device).clamp(min=1)
    return loss, {"loss": loss.detach(), "num_targets": int(mask.sum())}
