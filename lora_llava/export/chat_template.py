"""What an hf export ships so that plain transformers prepares inputs exactly as training did: the chat template and
the image processor.

Tokens: training (like the LLaVA reference) tokenizes the text after each ``<image>`` as a piece of its own, which
SentencePiece starts with its word-boundary piece ``▁`` (id 29871) before ``\n`` (13). A tokenizer given the whole
prompt in one string puts nothing between the ``<image>`` token and ``\n``. So the template writes ``<image> \n``:
the space becomes exactly that ``▁`` and the ids equal training's. A message that is only an image is ``<image>``
alone in training (no newline); the template then writes ``<image>  ASSISTANT:``, whose two spaces become the
``▁ ▁A...`` that SentencePiece gives the piece `` ASSISTANT:`` after the image.

Pixels: training pads an image to a square of the CLIP mean colour before CLIP's resize and centre crop (LLaVA-1.5's
``image_aspect_ratio: pad``); ``CLIPImageProcessor`` alone crops instead. transformers' ``LlavaImageProcessor`` with
``do_pad`` pads the same way.
"""

from __future__ import annotations

__all__ = ["VICUNA_CHAT_TEMPLATE", "padding_image_processor", "v0_chat_template"]

VICUNA_CHAT_TEMPLATE = (
    "{%- set system = 'A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user\\'s questions.' -%}"
    "{{- system + ' ' -}}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}{%- set images = 0 -%}"
    "{%- else -%}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') "
    "| join('\\n') -%}{%- set images = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- 'USER: ' + ('<image> \\n' * images if text else '<image>' * images + ' ') + text + ' ' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' + text + '</s>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)
"""The vicuna_v1 prompt as a chat template: ``apply_chat_template`` + the tokenizer give exactly training's ids."""


def v0_chat_template(start_end: bool) -> str:
    """The ``llava_v0`` ("###") prompt of LLaVA v1 as a chat template: ``{system}\n\n### Human: {q}\n### Assistant:
    {a}\n### Human: ...``. ``start_end``: each image is ``<im_start><image><im_end>`` (the processor expands the
    ``<image>``), as training wraps it. The space after an image stands for the ``▁`` SentencePiece starts the next
    piece with (see the module docstring)."""
    image = "<im_start><image><im_end>" if start_end else "<image>"
    return (
        "{%- set system = 'A chat between a curious human and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the human\\'s questions.' -%}"
        "{{- system + '\\n\\n###' -}}"
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}{%- set text = message['content'] -%}{%- set images = 0 -%}"
        "{%- else -%}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | "
        "map(attribute='text') | join('\\n') -%}{%- set images = message['content'] | selectattr('type', 'equalto', "
        "'image') | list | length -%}"
        "{%- endif -%}"
        "{%- if message['role'] == 'user' -%}"
        f"{{{{- ' Human: ' + ('{image} \\n' * images if text else '{image}' * images + ' ') + text + '\\n###' -}}}}"
        "{%- elif message['role'] == 'assistant' -%}{{- ' Assistant: ' + text + '\\n###' -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- ' Assistant:' -}}{%- endif -%}"
    )


def padding_image_processor(clip):
    """A ``LlavaImageProcessor`` that pads to a square of the mean colour, then does what ``clip`` (a
    ``CLIPImageProcessor``) does: what training's image path gives, pixel for pixel."""
    from transformers import LlavaImageProcessor

    keys = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
            "do_normalize", "image_mean", "image_std", "do_convert_rgb")
    return LlavaImageProcessor(do_pad=True, **{k: getattr(clip, k) for k in keys if hasattr(clip, k)})
