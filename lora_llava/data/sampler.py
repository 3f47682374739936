"""LLaVA's modality-length grouped sampling: batches of one modality and of similar length.

LLaVA-1.5 fine-tunes on a mix of image conversations (576 image tokens plus text, so long) and text-only
conversations (often short). Batching them in random order has two costs:

* padding: every row of a padded batch is as long as its longest row, so a short text-only sample next to an image
  sample is mostly padding. Batches of samples of similar length waste far fewer tokens;
* the vision tower: a batch holding a single image runs CLIP; a batch of text-only samples does not need it at all.

So, as the reference LLaVA trainer (``group_by_modality_length``) does, the image samples and the text-only samples
are each shuffled and cut into *megabatches* of one optimizer step (per-device batch x devices x accumulation steps);
each megabatch is sorted by length, longest first, and the megabatches of both modalities are shuffled together.
Only the two incomplete last megabatches are left over: they go, image part then text part, at the end of the epoch,
so at most one per-device batch mixes the modalities.

Unlike the reference, which draws part of its shuffle from the global RNG, the order depends on nothing but
``(seed, epoch)``: a resumed run sees exactly the batches the interrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Sampler

__all__ = ["ModalityLengthGroupedSampler", "modality_length_groups", "padding_efficiency"]


def modality_length_groups(
    lengths: Sequence[int],
    has_image: Sequence[bool],
    batch_size: int,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
    *,
    gradient_accumulation_steps: int = 1,
) -> list[int]:
    """One epoch's sample order: a permutation of ``range(len(lengths))``, grouped by modality and length.

    ``batch_size`` is the per-device batch. The order is cut into megabatches of
    ``batch_size * world_size * gradient_accumulation_steps`` samples (one optimizer step); each megabatch holds one
    modality and is sorted by length, longest first, so the per-device batches cut from it in turn are
    of similar lengths. (In distributed training accelerate hands consecutive batches to the ranks in turn, so every
    rank's batch comes from the same megabatch.) See the module docstring for the rest.
    """
    if len(lengths) != len(has_image):
        raise ValueError(f"lengths has {len(lengths)} entries but has_image has {len(has_image)}")
    for name, value in (("batch_size", batch_size), ("world_size", world_size),
                        ("gradient_accumulation_steps", gradient_accumulation_steps)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    megabatch = batch_size * world_size * gradient_accumulation_steps
    # A generator of our own: the global RNG is shared with dropout, the collator's workers and other samplers, so
    # drawing from it would make the order depend on everything that ran before. seed + epoch as in torch's
    # DistributedSampler: each epoch reshuffles, reproducibly.
    generator = torch.Generator().manual_seed(seed + epoch)
    full: list[list[int]] = []
    leftover: list[int] = []
    for modality in (True, False):
        indices = [i for i, flag in enumerate(has_image) if bool(flag) == modality]
        shuffled = [indices[j] for j in torch.randperm(len(indices), generator=generator).tolist()]
        # sorted() is stable, so equal lengths keep their shuffled order and the result stays deterministic.
        groups = [sorted(shuffled[s:s + megabatch], key=lambda i: lengths[i], reverse=True)
                  for s in range(0, len(shuffled), megabatch)]
        if groups and len(groups[-1]) < megabatch:
            leftover += groups.pop()
        full += groups
    order = torch.randperm(len(full), generator=generator).tolist()
    # The leftover starts on a batch boundary (full megabatches are whole batches), so of its per-device batches only
    # the one across the image / text boundary can mix the modalities.
    return [i for k in order for i in full[k]] + leftover


def padding_efficiency(order: Sequence[int], lengths: Sequence[int], batch_size: int) -> float:
    """Fraction of real tokens in the padded batches that ``order`` makes: sum of lengths / (rows x longest row).

    1.0 means no padding at all. Batches are consecutive runs of ``batch_size`` samples; the last may be short.
    """
    real = padded = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start:start + batch_size]]
        real += sum(batch)
        padded += len(batch) * max(batch)
    return real / padded if padded else 1.0


class ModalityLengthGroupedSampler(Sampler[int]):
    """A sampler yielding :func:`modality_length_groups` order, reshuffled by :meth:`set_epoch`.

    ``lengths`` are the samples' token counts and ``has_image`` whether each has an image; ``batch_size`` is the
    per-device batch. The Trainer calls :meth:`set_epoch` at the start of every epoch (through accelerate's data
    loader), so epoch *e* always gets the same order for the same ``seed``.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        has_image: Sequence[bool],
        batch_size: int,
        world_size: int = 1,
        seed: int = 0,
        *,
        gradient_accumulation_steps: int = 1,
    ):
        self.lengths = [int(n) for n in lengths]
        self.has_image = [bool(h) for h in has_image]
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.epoch = 0
        # Check the arguments now rather than at the first epoch, deep inside the training loop.
        modality_length_groups([], [], batch_size, world_size, gradient_accumulation_steps=gradient_accumulation_steps)
        if len(self.lengths) != len(self.has_image):
            raise ValueError(f"lengths has {len(self.lengths)} entries but has_image has {len(self.has_image)}")

    def set_epoch(self, epoch: int) -> None:
        """Select the order of epoch ``epoch`` (0-based)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        return iter(modality_length_groups(
            self.lengths, self.has_image, self.batch_size, self.world_size, self.seed, self.epoch,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
        ))
