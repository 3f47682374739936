"""LLaVA-1.5's tokenizer: the Llama-2 / Vicuna-v1.5 vocabulary with ``<image>`` and ``<pad>`` added as the llava-hf
checkpoints have them. The vocabulary ships with lora-llava (as a ``tokenizer.json`` and as SentencePiece's
``tokenizer.model``), so the data tools and the demo work offline.

Which tokenizer training uses: the one the LLaVA reference trained with, SentencePiece itself (``use_fast=False``,
``legacy=False``). The shipped ``tokenizer.json`` gives SentencePiece's ids on every text but one kind, a text that
*starts* with a space, which :func:`encode_like_sentencepiece` handles (tested against SentencePiece and against
the reference). transformers 5 converts a ``tokenizer.model``-only folder (Vicuna and original LLaVA checkpoints as
published) into a tokenizer that also splits whitespace runs *inside* a text differently (``"two  spaces"``), so a
folder whose ``tokenizer.model`` is the Llama-2 vocabulary gets the shipped tokenizer instead
(:func:`load_folder_tokenizer`).
"""

from __future__ import annotations

import functools
import gzip
import logging
import tempfile
from importlib import resources
from pathlib import Path

from ..errors import UsageError
from ..files import read_json
from .constants import IMAGE_END_TOKEN, IMAGE_START_TOKEN, IMAGE_TOKEN, PAD_TOKEN

__all__ = ["SENTENCEPIECE_MODEL", "add_llava_tokens", "encode_like_sentencepiece", "image_token_id",
           "image_wrap_ids", "is_llama2_sentencepiece", "is_llama2_sentencepiece_vocab", "llama2_sentencepiece_pieces",
           "load_folder_tokenizer", "load_tokenizer", "sentencepiece_model_bytes", "vicuna_tokenizer"]

logger = logging.getLogger(__name__)

SENTENCEPIECE_MODEL = "llama2-tokenizer.model"
"""The Llama-2 SentencePiece model shipped in ``lora_llava/assets`` (see PROVENANCE.md there)."""


def vicuna_tokenizer():
    """The real Llama-2 / Vicuna-v1.5 tokenizer (32,000 tokens), from the copy shipped in the package."""
    from transformers import LlamaTokenizer

    data = resources.files("lora_llava").joinpath("assets/llama2-tokenizer.json.gz").read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        path.write_bytes(gzip.decompress(data))
        return LlamaTokenizer(tokenizer_file=str(path))


def sentencepiece_model_bytes() -> bytes:
    """The shipped Llama-2 ``tokenizer.model`` (what exports in the original layout ship for the reference code)."""
    return resources.files("lora_llava").joinpath("assets", SENTENCEPIECE_MODEL).read_bytes()


def _read_pieces(data: bytes) -> tuple[tuple[str, float, int], ...] | None:
    """(piece, score, type) of a serialized SentencePiece model; None when it is not one."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb

        model = pb.ModelProto()
        model.ParseFromString(data)
    except Exception:  # noqa: BLE001 - any unreadable model is simply "not the Llama-2 one"
        return None
    return tuple((p.piece, p.score, p.type) for p in model.pieces)


@functools.lru_cache(maxsize=1)
def llama2_sentencepiece_pieces() -> tuple[tuple[str, float, int], ...]:
    """(piece, score, type) of every piece of the shipped Llama-2 SentencePiece model; ``type`` is SentencePiece's
    (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte), the values GGUF's token types use too."""
    return _read_pieces(sentencepiece_model_bytes()) or ()


def _rounded(pieces) -> list[tuple[str, float, int]]:
    return [(piece, round(score, 4), kind) for piece, score, kind in pieces]


def is_llama2_sentencepiece(path: str | Path) -> bool:
    """Is the SentencePiece model at ``path`` the Llama-2 / Vicuna vocabulary (same pieces, scores and types)?"""
    pieces = _read_pieces(Path(path).read_bytes())
    return pieces is not None and _rounded(pieces) == _rounded(llama2_sentencepiece_pieces())


def is_llama2_sentencepiece_vocab(tokenizer) -> bool:
    """Are the first 32,000 tokens of ``tokenizer`` the Llama-2 SentencePiece pieces (so the shipped
    ``tokenizer.model`` describes it)?"""
    pieces = llama2_sentencepiece_pieces()
    vocab = tokenizer.get_vocab()
    return len(vocab) >= len(pieces) and all(vocab.get(p) == i for i, (p, _, _) in enumerate(pieces))


def load_folder_tokenizer(folder: str | Path, trust_remote_code: bool = False):
    """The tokenizer of a checkpoint folder as training should see it (no ``<image>``/``<pad>`` added yet).

    A folder with a ``tokenizer.json`` gets it. A ``tokenizer.model``-only folder (Vicuna, original LLaVA) whose model
    is the Llama-2 vocabulary gets the shipped tokenizer, which tokenizes like SentencePiece; any other
    ``tokenizer.model`` gets transformers' conversion, with a warning that whitespace runs may split differently.
    """
    from transformers import AutoTokenizer

    folder = Path(folder)
    spm_file = folder / "tokenizer.model"
    if spm_file.is_file() and not (folder / "tokenizer.json").is_file():
        if is_llama2_sentencepiece(spm_file):
            tokenizer = vicuna_tokenizer()
            settings = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() \
                else {}
            if isinstance(settings, dict):
                for key in ("add_bos_token", "add_eos_token"):
                    if isinstance(settings.get(key), bool):
                        setattr(tokenizer, key, settings[key])
                if isinstance(settings.get("model_max_length"), int):
                    tokenizer.model_max_length = settings["model_max_length"]
            return tokenizer
        logger.warning("%s: tokenizer.model is not the Llama-2 vocabulary; transformers' conversion of it may split "
                       "runs of spaces differently from SentencePiece (the LLaVA reference)", spm_file)
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)


def encode_like_sentencepiece(tokenizer, text: str, add_special_tokens: bool):
    """``tokenizer(text, return_offsets_mapping=True)`` as SentencePiece (and the LLaVA reference) tokenizes ``text``
    when a tokenizer call starts with it: SentencePiece puts its word-boundary ``▁`` before the text even when the
    text starts with a space (``" x"`` -> ``▁ ▁x``), a ``tokenizers`` Metaspace does not (``▁x``). One more space in
    front gives the same pieces; offsets stay those of ``text``."""
    if not text.startswith((" ", "\u2581")):
        return tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    enc = tokenizer(" " + text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    enc["offset_mapping"] = [(max(a - 1, 0), max(b - 1, 0)) if b > 0 else (a, b) for a, b in enc["offset_mapping"]]
    return enc


def add_llava_tokens(tokenizer, start_end: bool = False) -> None:
    """Add ``<image>`` and ``<pad>`` as the llava-hf checkpoints have them (32000 and 32001 on Vicuna's vocabulary).

    ``start_end`` (LLaVA v1): ``<im_start>`` and ``<im_end>`` come between them, so on Vicuna's vocabulary the ids are
    ``<image>`` 32000, ``<im_start>`` 32001, ``<im_end>`` 32002, ``<pad>`` 32003: the rows of an original v1 checkpoint
    (``<im_patch>`` 32000, ``<im_start>`` 32001, ``<im_end>`` 32002) map one to one, ``<image>`` playing
    ``<im_patch>``'s part. Tokens the tokenizer has already keep their ids."""
    vocab = tokenizer.get_vocab()
    wanted = [IMAGE_TOKEN] + ([IMAGE_START_TOKEN, IMAGE_END_TOKEN] if start_end else [])
    missing = [t for t in wanted if t not in vocab]
    if missing:
        # One call: a second add_special_tokens call would replace the first one's additional_special_tokens.
        extra = getattr(tokenizer, "extra_special_tokens", None)  # transformers 5's name of the list
        present = [str(t) for t in extra if str(t) not in missing] if isinstance(extra, (list, tuple)) else []
        tokenizer.add_special_tokens({"additional_special_tokens": present + missing})
    if tokenizer.pad_token != PAD_TOKEN:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})


def image_token_id(tokenizer) -> int:
    """The id of ``<image>`` in ``tokenizer``; :class:`UsageError` when it has none (see :func:`add_llava_tokens`)."""
    found = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if found is None or found == tokenizer.unk_token_id:
        raise UsageError(f"the tokenizer has no '{IMAGE_TOKEN}' token (add_llava_tokens adds it)")
    return found


def image_wrap_ids(tokenizer) -> tuple[int, int] | None:
    """``(<im_start>, <im_end>)`` ids when ``tokenizer`` has both (LLaVA v1: each image is wrapped in them), else
    None. The tokenizer decides, so training, inference and an export's tokenizer always agree."""
    vocab = tokenizer.get_vocab()
    if IMAGE_START_TOKEN in vocab and IMAGE_END_TOKEN in vocab:
        return vocab[IMAGE_START_TOKEN], vocab[IMAGE_END_TOKEN]
    return None


def load_tokenizer(path: str | Path | None = None):
    """The shipped Vicuna tokenizer, or the one in a local folder (no remote code), with ``<image>`` and ``<pad>``
    added as the llava-hf checkpoints have them, so ids match what training tokenizes with."""
    if path is None:
        tokenizer = vicuna_tokenizer()
    else:
        if not Path(path).is_dir():
            raise UsageError(f"tokenizer '{path}' is not a local folder")
        try:
            tokenizer = load_folder_tokenizer(path)
        except (OSError, ValueError, TypeError) as e:
            raise UsageError(f"cannot load a tokenizer from '{path}' ({str(e).splitlines()[0][:300]})") from None
    add_llava_tokens(tokenizer)
    return tokenizer
