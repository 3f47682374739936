"""``python -m lora_llava`` is the ``lora-llava`` command."""

import sys

from .cli.main import main

sys.exit(main())
