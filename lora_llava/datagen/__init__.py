"""Making instruction data: GPT-assisted generation from annotated images (``data generate``) and LLaVA-1.5-style
mixtures of instruction and short-answer VQA data (``data mix``). Imports no torch."""

from __future__ import annotations
