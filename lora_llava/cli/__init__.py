"""The ``lora-llava`` command line: :func:`~lora_llava.cli.main.main` and one module per command group."""
