"""A run folder: its files (:class:`~lora_llava.run.folder.RunFolder`), the loss plot, and ``lora-llava report``."""
