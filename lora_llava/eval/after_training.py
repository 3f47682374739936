"""The recipe's ``eval:`` section: ``eval run`` on the model that just trained, into ``RUN/eval/<benchmark>/``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..infer.load import LoadedModel
from .runner import ANSWERS_FILE, run_eval

__all__ = ["eval_after_training"]


def eval_after_training(recipe, run_dir: str | Path, model, processor) -> dict[str, Any]:
    """Answer and score the recipe's ``eval`` benchmark with the trained ``model``; returns ``{"benchmark",
    "scores", "summary"}`` (``summary`` is what ``lora-llava sft`` prints; for ``custom`` it ends with the held-out
    accuracy line)."""
    e = recipe.eval
    run_dir = Path(run_dir)
    questions = e.questions or recipe.data.eval[0]
    out = run_dir / "eval" / e.benchmark
    (out / ANSWERS_FILE).unlink(missing_ok=True)  # answers of an earlier training in this folder are stale
    loaded = LoadedModel(model, processor, recipe.template, image_aspect_ratio=recipe.data.image_aspect_ratio,
                         kind="run", path=run_dir)
    result = run_eval(run_dir, e.benchmark, questions, out, image_folder=e.image_folder or recipe.data.image_folder,
                      annotations=e.annotations, batch_size=e.batch_size, limit=e.limit,
                      max_new_tokens=e.max_new_tokens, loaded=loaded, model_id=run_dir.name)
    scores = result.scores
    lines = [scores.table()]
    if e.benchmark == "custom":
        from .answers import read_answers
        from .custom import accuracy_line, read_custom_truth

        truth = read_custom_truth(questions)
        for a in read_answers(result.answers_file)[:3]:
            lines.append(f"  {a.question_id}: expected {truth[a.question_id][0]!r}, answered {a.text!r}")
        lines.append(accuracy_line(scores))
    lines.append(f"eval: {result.answers_file}, {result.scores_file}")
    return {"benchmark": e.benchmark, "scores": scores.to_dict(), "summary": "\n".join(lines)}
