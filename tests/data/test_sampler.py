"""train.group_by_modality_length: the order of the modality-length grouped sampler, and the trainer using it."""

from __future__ import annotations

import json
import random

import pytest
import torch

from lora_llava.config.recipe import recipe_from_dict
from lora_llava.data import LlavaCollator, ModalityLengthGroupedSampler, modality_length_groups
from lora_llava.data.sampler import padding_efficiency
from lora_llava.errors import RecipeError

# (images, text-only, per-device batch, world size, accumulation steps): even and uneven splits, one modality only,
# fewer samples than a megabatch, a megabatch of several devices and steps.
CASES = [(40, 24, 4, 1, 1), (37, 29, 4, 1, 1), (50, 0, 3, 1, 1), (0, 13, 4, 1, 1), (3, 2, 8, 1, 1),
         (61, 45, 2, 2, 3), (100, 7, 4, 4, 1)]


def _mix(n_image: int, n_text: int, seed: int = 0) -> tuple[list[int], list[bool]]:
    """LLaVA-like lengths: image samples 576 image tokens + some text, text-only samples short to medium."""
    rng = random.Random(seed)
    lengths = [576 + rng.randint(40, 300) for _ in range(n_image)] + [rng.randint(20, 500) for _ in range(n_text)]
    has_image = [True] * n_image + [False] * n_text
    pairs = list(zip(lengths, has_image))
    rng.shuffle(pairs)  # interleaved in the file, as in LLaVA's mix
    return [n for n, _ in pairs], [h for _, h in pairs]


def _batches(order: list[int], size: int) -> list[list[int]]:
    return [order[s:s + size] for s in range(0, len(order), size)]


def _leftover(has_image: list[bool], megabatch: int) -> int:
    n_image = sum(has_image)
    return n_image % megabatch + (len(has_image) - n_image) % megabatch


@pytest.mark.parametrize(("n_image", "n_text", "bs", "ws", "ga"), CASES)
def test_every_index_once(n_image, n_text, bs, ws, ga):
    lengths, has_image = _mix(n_image, n_text)
    for epoch in range(3):
        order = modality_length_groups(lengths, has_image, bs, ws, seed=7, epoch=epoch, gradient_accumulation_steps=ga)
        assert sorted(order) == list(range(len(lengths)))
    assert modality_length_groups([], [], 4) == []


def test_deterministic_per_seed_and_epoch():
    lengths, has_image = _mix(40, 24)
    first = modality_length_groups(lengths, has_image, 4, seed=3, epoch=0)
    torch.manual_seed(123)  # the global RNG has no say
    assert modality_length_groups(lengths, has_image, 4, seed=3, epoch=0) == first
    assert modality_length_groups(lengths, has_image, 4, seed=3, epoch=1) != first
    assert modality_length_groups(lengths, has_image, 4, seed=4, epoch=0) != first

    sampler = ModalityLengthGroupedSampler(lengths, has_image, batch_size=4, seed=3)
    assert len(sampler) == 64
    assert list(sampler) == first and list(sampler) == first  # iterating again does not move on
    sampler.set_epoch(1)
    assert list(sampler) == modality_length_groups(lengths, has_image, 4, seed=3, epoch=1)
    # A fresh sampler (a resumed run) set to the same epoch gives the same order.
    resumed = ModalityLengthGroupedSampler(lengths, has_image, batch_size=4, seed=3)
    resumed.set_epoch(1)
    assert list(resumed) == list(sampler)


@pytest.mark.parametrize(("n_image", "n_text", "bs", "ws", "ga"), CASES)
def test_batches_keep_to_one_modality_but_the_leftover(n_image, n_text, bs, ws, ga):
    lengths, has_image = _mix(n_image, n_text)
    for epoch in range(5):
        order = modality_length_groups(lengths, has_image, bs, ws, epoch=epoch, gradient_accumulation_steps=ga)
        mixed = [b for b, batch in enumerate(_batches(order, bs)) if len({has_image[i] for i in batch}) > 1]
        assert len(mixed) <= 1
        # ...and that one batch lies in the leftover at the end of the epoch.
        tail = _leftover(has_image, bs * ws * ga)
        assert all(b * bs >= len(order) - tail for b in mixed)


@pytest.mark.parametrize(("n_image", "n_text", "bs", "ws", "ga"), CASES)
def test_megabatches_sorted_longest_first(n_image, n_text, bs, ws, ga):
    lengths, has_image = _mix(n_image, n_text)
    megabatch = bs * ws * ga
    order = modality_length_groups(lengths, has_image, bs, ws, seed=1, gradient_accumulation_steps=ga)
    tail = _leftover(has_image, megabatch)
    full, leftover = order[:len(order) - tail], order[len(order) - tail:]
    for group in _batches(full, megabatch):
        assert len(group) == megabatch and len({has_image[i] for i in group}) == 1
        assert [lengths[i] for i in group] == sorted((lengths[i] for i in group), reverse=True)
    # The leftover: the image part, then the text-only part, each sorted.
    n_image_left = sum(has_image[i] for i in leftover)
    assert all(has_image[i] for i in leftover[:n_image_left])
    for part in (leftover[:n_image_left], leftover[n_image_left:]):
        assert [lengths[i] for i in part] == sorted((lengths[i] for i in part), reverse=True)


def test_megabatches_come_in_shuffled_order():
    lengths, has_image = _mix(40, 40)
    order = modality_length_groups(lengths, has_image, 4, seed=0)
    modalities = [has_image[group[0]] for group in _batches(order, 4)]
    assert modalities != sorted(modalities) and modalities != sorted(modalities, reverse=True)


def test_less_padding_than_random_batches():
    lengths, has_image = _mix(400, 400, seed=5)
    rng = random.Random(0)
    for bs in (4, 8):
        shuffled = list(range(len(lengths)))
        random_eff = []
        for _ in range(5):
            rng.shuffle(shuffled)
            random_eff.append(padding_efficiency(shuffled, lengths, bs))  # about 0.65 (bs 4), 0.6 (bs 8)
        for epoch in range(3):
            # A megabatch of one batch: only the modality split helps (about 0.82 / 0.77).
            alone = padding_efficiency(modality_length_groups(lengths, has_image, bs, epoch=epoch), lengths, bs)
            assert alone > max(random_eff) + 0.12, (bs, alone, random_eff)
            # A megabatch of 4 accumulation steps is sorted by length too (about 0.94 / 0.92).
            steps = modality_length_groups(lengths, has_image, bs, epoch=epoch, gradient_accumulation_steps=4)
            sorted_eff = padding_efficiency(steps, lengths, bs)
            assert sorted_eff > max(random_eff) + 0.25 and sorted_eff > alone + 0.1, (bs, sorted_eff, alone)


def test_bad_arguments():
    with pytest.raises(ValueError, match="has_image has 1"):
        ModalityLengthGroupedSampler([5, 6], [True], batch_size=2)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        ModalityLengthGroupedSampler([5], [True], batch_size=0)
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be >= 1"):
        modality_length_groups([5], [True], 2, gradient_accumulation_steps=0)


def test_recipe_key_and_conflict(make_recipe):
    raw = make_recipe()
    assert recipe_from_dict(raw).train.group_by_modality_length is False
    raw["train"].update(group_by_modality_length=True)
    assert recipe_from_dict(raw).train.group_by_modality_length is True
    raw["train"].update(train_sampling_strategy="group_by_length")
    with pytest.raises(RecipeError, match="train.group_by_modality_length and train.train_sampling_strategy"):
        recipe_from_dict(raw)


class _Recording(LlavaCollator):
    """The real collator, noting the ids of each batch it makes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ids: list[list[str]] = []

    def __call__(self, features):
        self.ids.append([f["id"] for f in features])
        return super().__call__(features)


def test_trainer_dataloader_follows_the_sampler(make_recipe, shapes_data, tmp_path):
    from lora_llava.model.stage import build_model
    from lora_llava.train.sft import build_datasets
    from lora_llava.train.trainer import build_trainer

    folder, train_file, _ = shapes_data
    records = json.loads(train_file.read_text())[:14]
    records += [{"id": f"text-{i}", "conversations": [
        {"from": "human", "value": "Tell me about shapes. " * (1 + i)},
        {"from": "gpt", "value": "Shapes have sides."}]} for i in range(11)]
    random.Random(0).shuffle(records)
    (tmp_path / "mixed.json").write_text(json.dumps(records))
    raw = make_recipe()
    raw["quant"] = {"bits": 16}
    raw["data"]["train"] = str(tmp_path / "mixed.json")
    raw["train"].update(group_by_modality_length=True, per_device_train_batch_size=3, seed=11)
    recipe = recipe_from_dict(raw)
    model, processor = build_model(recipe)
    train_ds, _ = build_datasets(recipe, processor, model.config)
    collator = _Recording(processor.image_processor, processor.tokenizer.pad_token_id, recipe.data.image_folder)
    trainer = build_trainer(recipe, model, processor, train_ds.to_hf(), collator=collator)
    lengths = [row["length"] for row in train_ds.rows]
    has_image = [bool(row["image_files"]) for row in train_ds.rows]
    assert 0 < sum(has_image) < len(has_image) and len(set(lengths)) > 2

    loader = trainer.get_train_dataloader()
    seen = {}
    for epoch in (0, 1):
        loader.set_epoch(epoch)  # what the training loop calls at the start of each epoch
        collator.ids.clear()
        for _ in loader:
            pass
        expected = [train_ds.rows[i]["id"] for i in modality_length_groups(lengths, has_image, 3, seed=11, epoch=epoch)]
        assert collator.ids == _batches(expected, 3), epoch
        seen[epoch] = collator.ids[:]
    assert seen[0] != seen[1]
