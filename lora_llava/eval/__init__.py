"""Evaluation: LLaVA-1.5's benchmark protocol (question files, greedy answers in LLaVA's answer format) and each
benchmark's scorer, written to give the same figures as the reference scorers on the same answer files."""
