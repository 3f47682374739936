"""Chat templates that make ``apply_chat_template`` give exactly the prompt string training used."""

from __future__ import annotations

__all__ = ["VICUNA_CHAT_TEMPLATE"]

VICUNA_CHAT_TEMPLATE = (
    "{%- set system = 'A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user\\'s questions.' -%}"
    "{{- system + ' ' -}}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}{%- set images = 0 -%}"
    "{%- else -%}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') "
    "| join('\\n') -%}{%- set images = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' + '<image>\\n' * images + text + ' ' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' + text + '</s>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)
"""The vicuna_v1 prompt as a chat template: ``apply_chat_template`` gives exactly the string training used."""
