"""The prepared GPU run of issue 20 (``benchmarks/gpu/run.sh``) and its helpers, each a module run from the repository
root as ``python -m benchmarks.gpu.<name>``:

- ``env_check``: library versions, the GPU, and its measured bf16 matmul and copy ceilings (``env.json``).
- ``flex_check``: padding-free attention against padded sdpa on one batch: same loss (flex attention is exact).
- ``export_check``: a merged tiny export's greedy tokens in bf16 on CUDA against the CPU.
- ``summary``: the run's figures in one table (MFU against 989 TFLOP/s and against the measured ceiling, planner
  estimate beside each peak).

``run.sh --dry-run`` runs every step on the CPU at tiny shapes.
"""
