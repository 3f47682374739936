"""lora-llava's benchmark scripts. Each runs from the repository root as a module, for example::

    python -m benchmarks.train_step --help

``RESULTS.md`` records their figures with the command and machine. The code the scripts share is in
:mod:`benchmarks._shared` (nothing there is a script of its own). :mod:`benchmarks.gpu` is the prepared GPU run
(``bash benchmarks/gpu/run.sh``; ``--dry-run`` on the CPU) and its helpers."""
