"""``lora-llava eval run``: LLaVA answer files from a run folder and from its export are identical, batched answers
equal batch-size-1 answers, an interrupted run resumes, and the demo's held-out split is scored as ``custom``."""

from __future__ import annotations

import json
import re

import pytest

from lora_llava.cli import main as cli
from lora_llava.errors import DataError, UsageError
from lora_llava.eval.runner import run_eval

LIMIT = 6
TOKENS = 8


@pytest.fixture(scope="module")
def run16(trained_run):
    return trained_run(16).output_dir


@pytest.fixture(scope="module")
def export16(run16, tmp_path_factory):
    from lora_llava.export.merge import merge

    return merge(run16, tmp_path_factory.mktemp("export") / "hf", dtype="fp32", progress=False).out


def _answers(folder):
    return [json.loads(line) for line in (folder / "answers.jsonl").read_text().splitlines()]


def _eval(path, out, shapes_data, batch_size, *extra):
    folder, _, eval_file = shapes_data
    return cli.main(["eval", "run", str(path), "--benchmark", "custom", "--questions", str(eval_file),
                     "--image-folder", str(folder), "--out", str(out), "--limit", str(LIMIT), "--batch-size",
                     str(batch_size), "--max-new-tokens", str(TOKENS), *extra])


def test_run_folder_and_export_answer_alike_batched_or_not(run16, export16, shapes_data, tmp_path, capsys):
    assert _eval(run16, tmp_path / "run-b4", shapes_data, 4) == 0
    printed = capsys.readouterr().out
    assert _eval(run16, tmp_path / "run-b1", shapes_data, 1) == 0
    assert _eval(export16, tmp_path / "export-b3", shapes_data, 3) == 0
    batched, single, export = (_answers(tmp_path / d) for d in ("run-b4", "run-b1", "export-b3"))
    texts = [a["text"] for a in batched]
    assert len(texts) == LIMIT and any(texts)
    assert texts == [a["text"] for a in single]      # left-padded batches answer as batch size 1
    assert texts == [a["text"] for a in export]      # the export answers as the run folder
    records = json.loads(shapes_data[2].read_text())[:LIMIT]
    first = batched[0]
    assert set(first) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert first["question_id"] == records[0]["id"]
    assert first["prompt"] == records[0]["conversations"][0]["value"].replace("<image>", "").strip()
    assert first["model_id"] == run16.name
    # scores.json: custom compares each answer with the record's first answer.
    scores = json.loads((tmp_path / "run-b4" / "scores.json").read_text())
    expected = [r["conversations"][1]["value"].strip() == t.strip() for r, t in zip(records, texts)]
    assert scores["benchmark"] == "custom" and scores["n"] == LIMIT
    assert scores["exact_match"] == pytest.approx(100 * sum(expected) / LIMIT)
    assert "vqa_match" in printed and f"{LIMIT} answers written" in printed
    assert f"held-out accuracy: {scores['correct'] / LIMIT:.3f} ({scores['correct']}/{LIMIT}" in printed


def test_interrupted_run_resumes(run16, shapes_data, tmp_path):
    folder, _, eval_file = shapes_data
    out = tmp_path / "e"
    kwargs = dict(image_folder=folder, batch_size=4, limit=LIMIT, max_new_tokens=TOKENS, progress=False)
    first = run_eval(run16, "custom", eval_file, out, **kwargs)
    assert (first.written, first.skipped) == (LIMIT, 0)
    full = (out / "answers.jsonl").read_text().splitlines()
    # Killed while writing: two answers lost, the third cut in the middle of its line.
    (out / "answers.jsonl").write_text("\n".join(full[:3]) + "\n" + full[3][:20])
    again = run_eval(run16, "custom", eval_file, out, **kwargs)
    assert (again.written, again.skipped) == (3, 3)
    resumed = _answers(out)
    assert [a["question_id"] for a in resumed] == [json.loads(x)["question_id"] for x in full]
    assert [a["text"] for a in resumed] == [json.loads(x)["text"] for x in full]
    # Nothing left to answer: no model is loaded (the path does not even exist).
    done = run_eval("/nonexistent-model", "custom", eval_file, out, model_id=run16.name, **kwargs)
    assert done.written == 0 and done.scores.n == LIMIT
    # Another model's answers are not resumed into.
    with pytest.raises(UsageError, match=r"answers\.jsonl, line 1: an answer of model_id .*mix two models"):
        run_eval("/other-model", "custom", eval_file, out, **kwargs)


def test_bad_question_files_name_the_line(shapes_data, tmp_path):
    folder, _, _ = shapes_data
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 1, "image": "images/eval_00000.png", "text": "Q?"}) + "\n"
                 + json.dumps({"question_id": 2, "image": "missing.png", "text": "Q?"}) + "\n")
    with pytest.raises(DataError, match=r"q\.jsonl, line 2: image 'missing\.png' not found"):
        run_eval("/nonexistent-model", "pope", q, tmp_path / "out", image_folder=folder)


@pytest.fixture(scope="module")
def evaluated_run(make_recipe, shapes_data, tmp_path_factory):
    """A tiny 16-bit run with an ``eval:`` section and checkpoints at steps 2 and 4: (TrainResult, run folder)."""
    from lora_llava.config.recipe import recipe_from_dict
    from lora_llava.train.sft import train

    _, _, eval_file = shapes_data
    run = tmp_path_factory.mktemp("evaluated") / "run"
    raw = make_recipe(quant={"bits": 16}, model={"attn_implementation": "sdpa"}, data={"eval": str(eval_file)},
                      train={"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "learning_rate": 2e-2,
                             "output_dir": str(run)},
                      eval={"benchmark": "custom", "limit": 4, "max_new_tokens": 6, "batch_size": 2})
    return train(recipe_from_dict(raw)), run


def test_recipe_eval_section_runs_after_training_and_report_lists_it(evaluated_run, capsys):
    result, run = evaluated_run
    scores_file = run / "eval" / "custom" / "scores.json"
    scores = json.loads(scores_file.read_text())
    assert scores["n"] == 4 and result.metrics["scores"] == scores
    assert "held-out accuracy:" in result.metrics["summary"]
    assert len(_answers(scores_file.parent)) == 4
    assert cli.main(["report", str(run)]) == 0
    assert re.search(rf"eval custom +vqa_match {scores['vqa_match']:.2f}, exact_match", capsys.readouterr().out)


def test_recipe_eval_section_is_checked(make_recipe):
    from lora_llava.config.recipe import recipe_from_dict
    from lora_llava.errors import RecipeError

    with pytest.raises(RecipeError) as e:
        recipe_from_dict(make_recipe(eval={"benchmark": "pope", "limit": 0, "questions": "/nope.jsonl"}))
    text = str(e.value)
    assert "eval.annotations: pope needs" in text and "eval.limit: must be at least 1" in text
    assert "eval.questions: '/nope.jsonl' does not exist" in text


def test_training_checkpoint_answers_as_the_run_it_became(evaluated_run, shapes_data, tmp_path):
    folder, _, eval_file = shapes_data
    run = evaluated_run[1]
    kwargs = dict(image_folder=folder, limit=4, max_new_tokens=TOKENS, batch_size=4, progress=False)
    final = run_eval(run, "custom", eval_file, tmp_path / "final", **kwargs)
    last = run_eval(run / "checkpoint-4", "custom", eval_file, tmp_path / "ckpt4", **kwargs)
    run_eval(run / "checkpoint-2", "custom", eval_file, tmp_path / "ckpt2", **kwargs)
    assert [a["text"] for a in _answers(tmp_path / "ckpt4")] == [a["text"] for a in _answers(tmp_path / "final")]
    assert _answers(tmp_path / "ckpt2")[0]["model_id"] == "checkpoint-2"
    assert final.scores.n == last.scores.n == 4
    # checkpoint-2 is loaded with its own projector, not the final one
    import torch

    from lora_llava.infer.load import load_for_inference
    from lora_llava.model.projector import projector_state, read_projector

    loaded = load_for_inference(run / "checkpoint-2")
    assert loaded.kind == "run checkpoint"
    ours = sorted(projector_state(loaded.model).items())
    saved = sorted(read_projector(run / "checkpoint-2" / "projector.safetensors").items())
    end = sorted(read_projector(run / "projector.safetensors").items())
    assert [k.rsplit(".", 2)[-2:] for k, _ in ours] == [k.rsplit(".", 2)[-2:] for k, _ in saved]
    assert all(torch.equal(a.float(), b.float()) for (_, a), (_, b) in zip(ours, saved))
    assert not all(torch.equal(a, b) for (_, a), (_, b) in zip(saved, end))


def test_eval_run_on_a_jsonl_benchmark_scores_by_category(run16, shapes_data, tmp_path, capsys):
    folder, _, eval_file = shapes_data
    images = [r["image"] for r in json.loads(eval_file.read_text())[:4]]
    ann = tmp_path / "coco"
    ann.mkdir()
    questions, labels = [], {"random": [], "popular": []}
    for i, image in enumerate(images):
        cat = ("random", "popular")[i % 2]
        q = f"Is there a circle number {i} in the image?"
        labels[cat].append({"question_id": len(labels[cat]) + 1, "image": image, "text": q, "label": "yes"})
        questions.append({"question_id": 100 + i, "image": image, "category": cat,
                          "text": q + "\nAnswer the question using a single word or phrase."})
    for cat, rows in labels.items():
        (ann / f"coco_pope_{cat}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    qfile = tmp_path / "llava_pope_test.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
    out = tmp_path / "pope"
    assert cli.main(["eval", "run", str(run16), "--benchmark", "pope", "--questions", str(qfile), "--image-folder",
                     str(folder), "--annotations", str(ann), "--out", str(out), "--max-new-tokens", "4"]) == 0
    answers = _answers(out)
    assert [a["metadata"] for a in answers] == [{"category": q["category"]} for q in questions]
    assert [a["prompt"] for a in answers] == [q["text"] for q in questions]
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores["per_category"]) == {"random", "popular"} and scores["n"] == 4
    # Every label is "yes": the yes-ratio is the accuracy, per category.
    for cat, values in scores["per_category"].items():
        assert values["yes_ratio"] == values["accuracy"]
    # The answer file scores the same without the question file (categories come from metadata).
    assert cli.main(["eval", "score", "--benchmark", "pope", "--answers", str(out / "answers.jsonl"),
                     "--annotations", str(ann), "--out", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["per_category"] == scores["per_category"]
    assert "pope: 4 answers scored" in capsys.readouterr().out
