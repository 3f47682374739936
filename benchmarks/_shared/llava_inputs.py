"""LLaVA-1.5's tokenizer and processor as the benchmarks build them offline, and TRL's side of the comparisons:
LLaVA's prompts as chat templates and LLaVA-format records as a TRL conversational vision dataset."""

from __future__ import annotations

from pathlib import Path

CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
# vicuna_v1 as a chat template: "<s> SYSTEM USER: <image>\nq ASSISTANT: a</s>USER: ..."; answers in generation marks.
CHAT_TEMPLATE = (
    "{{ bos_token }} " + SYSTEM + " {% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>\n{% else %}{{ p['text'] }}{% endif %}"
    "{% endfor %} ASSISTANT:{% else %}{% generation %} {% for p in m['content'] %}{{ p['text'] }}{% endfor %}"
    "</s>{% endgeneration %}{% endif %}{% endfor %}"
)
PLAIN_TEMPLATE = (  # LLaVA's stage-1 "plain" prompt, "<s><image>{caption}\n", as a chat template for TRL
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>{% endif %}{% endfor %}{% else %}{% generation %}{% for p in m['content'] %}"
    "{{ p['text'] }}{% endfor %}\n{% endgeneration %}{% endif %}{% endfor %}"
)


def llava_tokenizer():
    """The real Vicuna-v1.5 tokenizer with ``<image>`` and ``<pad>`` (32,000 and 32,001), as llava-hf has it."""
    from lora_llava.llava.tokenizer import add_llava_tokens, vicuna_tokenizer

    tok = vicuna_tokenizer()
    add_llava_tokens(tok)
    return tok


def llava_processor(tokenizer, image_size: int = 336, patch_size: int = 14, chat_template: str | None = None):
    """A ``LlavaProcessor`` with a local ``CLIPImageProcessor`` (CLIP mean / std, ``image_size`` px)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    from lora_llava.llava.constants import CLIP_MEAN

    clip = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return LlavaProcessor(image_processor=clip, tokenizer=tokenizer, patch_size=patch_size,
                          num_additional_image_tokens=1, vision_feature_select_strategy="default",
                          image_token="<image>", chat_template=chat_template)  # noqa: S106 - a token


def trl_messages(record: dict) -> list[dict]:
    """A LLaVA-format record's conversation as chat messages, the ``<image>`` placeholder dropped (TRL's processor
    puts the image in from the ``images`` column)."""
    return [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"].replace("<image>\n", "")}
            for t in record["conversations"]]


def trl_dataset(records: list[dict], image_folder: Path):
    """The records as TRL's conversational vision dataset: ``messages`` + ``images`` (decoded lazily, as a
    ``datasets`` Image column is in a real TRL run)."""
    import datasets

    messages = [trl_messages(r) for r in records]
    images = [[str(image_folder / r["image"])] if "image" in r else [] for r in records]
    ds = datasets.Dataset.from_dict({"messages": messages, "images": images})
    return ds.cast_column("images", datasets.List(datasets.Image()))
