"""LLaVA facts with no model code: constants, checkpoint layouts and their tensor names, the tokenizer's added
tokens, and :class:`~lora_llava.llava.spec.ModelSpec` (what a recipe's model is, from its config files)."""
