"""What the benchmark scripts share:

- ``machine``: the machine / library-versions line every report starts with, the repository root.
- ``assets``: the shared-assets folder (real GPT-4 instruction text, two photos) and its reader.
- ``llava_inputs``: LLaVA-1.5's tokenizer and processor, and TRL's side of the comparisons (LLaVA's prompts as chat
  templates, records as a TRL conversational dataset).
- ``checkpoint``: random-weight LLaVA-1.5-shaped checkpoints in the llava-hf layout.
- ``synthetic_data``: LLaVA-format stage-1 / stage-2 records at target token counts, with random JPEGs.
- ``flops``: the model-FLOPs formula and GPU peaks behind MFU.
- ``timing``: median timing, and a ``TrainerCallback`` that records every training step.
- ``train_worker``: one train-step configuration in a process of its own.
- ``step_report``: the train-step benchmark's tables and goal checks.

Modules import only the standard library at their top, so a script that imports them stays light (the merge
benchmark measures an idle child's memory).
"""
