"""Inference on a run folder or an export: loading it as trained, batched greedy answers, streamed chat, question
files."""
