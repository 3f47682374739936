"""LLaVA-1.5's tokenizer: the Llama-2 / Vicuna-v1.5 vocabulary with ``<image>`` and ``<pad>`` added as the llava-hf
checkpoints have them. The vocabulary ships with lora-llava, so the data tools and the demo work offline."""

from __future__ import annotations

import gzip
import tempfile
from importlib import resources
from pathlib import Path

from ..errors import UsageError
from .constants import IMAGE_TOKEN, PAD_TOKEN

__all__ = ["add_llava_tokens", "image_token_id", "load_tokenizer", "vicuna_tokenizer"]


def vicuna_tokenizer():
    """The real Llama-2 / Vicuna-v1.5 tokenizer (32,000 tokens), from the copy shipped in the package."""
    from transformers import LlamaTokenizer

    data = resources.files("lora_llava").joinpath("assets/llama2-tokenizer.json.gz").read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        path.write_bytes(gzip.decompress(data))
        return LlamaTokenizer(tokenizer_file=str(path))


def add_llava_tokens(tokenizer) -> None:
    """Add ``<image>`` and ``<pad>`` as the llava-hf checkpoints have them (32000 and 32001 on Vicuna's vocabulary)."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token != PAD_TOKEN:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})


def image_token_id(tokenizer) -> int:
    """The id of ``<image>`` in ``tokenizer``; :class:`UsageError` when it has none (see :func:`add_llava_tokens`)."""
    found = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if found is None or found == tokenizer.unk_token_id:
        raise UsageError(f"the tokenizer has no '{IMAGE_TOKEN}' token (add_llava_tokens adds it)")
    return found


def load_tokenizer(path: str | Path | None = None):
    """The shipped Vicuna tokenizer, or the one in a local folder (no remote code), with ``<image>`` and ``<pad>``
    added as the llava-hf checkpoints have them, so ids match what training tokenizes with."""
    if path is None:
        tokenizer = vicuna_tokenizer()
    else:
        if not Path(path).is_dir():
            raise UsageError(f"tokenizer '{path}' is not a local folder")
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        except (OSError, ValueError, TypeError) as e:
            raise UsageError(f"cannot load a tokenizer from '{path}' ({str(e).splitlines()[0][:300]})") from None
    add_llava_tokens(tokenizer)
    return tokenizer
