"""Training: ``train(recipe)``, the trainer (:func:`~lora_llava.train.trainer.build_trainer`), the answer-only loss,
multi-process launches and checkpoints."""
