"""Benchmarks with closed answers: GQA (exact match), ScienceQA (option letters), POPE (yes/no, per category),
MME (yes/no pairs per image, perception and cognition totals). Each follows the reference scorer's parsing rules,
quirks included (specs/evaluation.md)."""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..errors import DataError
from .answers import Answer, Scores, read_json_file, read_jsonl_objects

logger = logging.getLogger(__name__)

__all__ = ["MME_COGNITION", "MME_PERCEPTION", "POPE_CATEGORIES", "mme_label", "pope_label", "read_mme_truth",
           "scienceqa_letter", "score_gqa", "score_mme", "score_pope", "score_scienceqa"]

# ---------------------------------------------------------------- GQA


def score_gqa(answers: list[Answer], annotations: str | Path) -> Scores:
    """GQA accuracy (x100) against ``testdev_balanced_questions.json``: the answer with trailing periods removed and
    lower-cased must equal the question's ``answer``; also binary / open and per structural type, as GQA's eval."""
    questions = read_json_file(annotations, dict, "GQA questions (testdev_balanced_questions.json)")
    predictions: dict[str, str] = {}
    for a in answers:
        key = str(a.question_id)
        if key not in questions:
            raise DataError(f"{a.where}: question_id {a.question_id!r} is not in {annotations} (answers of another "
                            "benchmark or split?)")
        predictions[key] = a.text.rstrip(".").lower()
    correct, binary_open, structural = [], defaultdict(list), defaultdict(list)
    for qid, q in questions.items():  # in the questions file's order, as GQA's eval
        if qid not in predictions:
            continue
        if not isinstance(q, dict) or "answer" not in q:
            raise DataError(f"{annotations}: question '{qid}' has no 'answer'")
        score = float(1 if predictions[qid] == q["answer"] else 0)
        correct.append(score)
        kind = (q.get("types") or {}).get("structural")
        if kind is not None:
            structural[kind].append(score)
            binary_open["open" if kind == "query" else "binary"].append(score)
    metrics = {"accuracy": _avg(correct) * 100}
    for k in ("binary", "open"):
        if binary_open[k]:
            metrics[k] = _avg(binary_open[k]) * 100
    per_category = {k: {"accuracy": _avg(v) * 100, "n": len(v)} for k, v in sorted(structural.items())}
    return Scores("gqa", metrics, per_category, n=len(correct))


def _avg(values: list[float]) -> float:
    return float(sum(values)) / len(values) if values else 0.0


# ---------------------------------------------------------------- ScienceQA

_OPTIONS = ("A", "B", "C", "D", "E")
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def scienceqa_letter(text: str) -> str:
    """The option letter an answer gives, or ``FAILED``: the whole text when it is one of A-E; its first character
    when that is one of A-E and ``". "`` follows; else the one match of ``The answer is X.`` (any character in the
    place of the period, as the reference's pattern has it)."""
    if text in _OPTIONS:
        return text
    if len(text) >= 3 and text[0] in _OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def score_scienceqa(answers: list[Answer], annotations: str | Path, split: str = "test",
                    only: set | None = None) -> Scores:
    """ScienceQA accuracy (x100) overall and on the image questions (``img_accuracy``: answers whose saved prompt
    holds ``<image>``). ``annotations`` is the folder with ``problems.json`` and ``pid_splits.json`` (or
    ``problems.json`` itself, with ``pid_splits.json`` beside it). Every problem of the split is scored; one without
    an answer counts as FAILED (wrong), as in the reference. ``only`` restricts the split to these problem ids (a
    ``--limit`` run)."""
    folder = Path(annotations)
    folder = folder.parent if folder.name == "problems.json" else folder
    problems = read_json_file(folder / "problems.json", dict, "ScienceQA problems.json")
    splits = read_json_file(folder / "pid_splits.json", dict, "ScienceQA pid_splits.json")
    if split not in splits:
        raise DataError(f"{folder / 'pid_splits.json'}: no split '{split}' (has {', '.join(sorted(splits))})")
    by_id: dict[Any, Answer] = {}
    for a in answers:
        if a.question_id not in problems:
            hint = (f" (a number; ScienceQA's ids are strings such as '{a.question_id}')"
                    if not isinstance(a.question_id, str) and str(a.question_id) in problems else "")
            raise DataError(f"{a.where}: question_id {a.question_id!r} is not a problem of {folder / 'problems.json'}"
                            f"{hint}")
        by_id[a.question_id] = a  # the last answer of a problem counts, as in the reference
    correct = total = img_correct = img_total = failed = missing = 0
    per_category: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for pid in splits[split]:
        if only is not None and pid not in only:
            continue
        problem = problems.get(pid)
        if not isinstance(problem, dict) or "choices" not in problem or "answer" not in problem:
            raise DataError(f"{folder / 'problems.json'}: problem '{pid}' has no 'choices' and 'answer'")
        answer = by_id.get(pid)
        missing += answer is None
        text, prompt = (answer.text, answer.prompt) if answer is not None else ("FAILED", "Unknown")
        letter = scienceqa_letter(text)
        failed += letter == "FAILED"
        index = _OPTIONS.index(letter) if letter in _OPTIONS[:len(problem["choices"])] else -1
        ok = int(index == problem["answer"])
        correct += ok
        total += 1
        if "<image>" in prompt:
            img_correct += ok
            img_total += 1
        cat = per_category[str(problem.get("subject", "all"))]
        cat[0] += ok
        cat[1] += 1
    if not total:
        raise DataError(f"no ScienceQA problem of split '{split}' to score")
    metrics = {"accuracy": correct / total * 100,
               "img_accuracy": img_correct / img_total * 100 if img_total else 0.0}
    return Scores("scienceqa", metrics,
                  {k: {"accuracy": c / n * 100, "n": n} for k, (c, n) in sorted(per_category.items())},
                  n=total, failed_to_parse=failed,
                  extra={"correct": correct, "img_correct": img_correct, "img_n": img_total, "missing": missing})


# ---------------------------------------------------------------- POPE

POPE_CATEGORIES = ("adversarial", "popular", "random")


def pope_label(text: str) -> str:
    """``no`` when the first sentence (cut at the first ``.``, commas removed, split on single spaces) has the word
    ``No``, ``not`` or ``no``; else ``yes``."""
    first = text.split(".")[0].replace(",", "")
    words = first.split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _pope_metrics(preds: list[str], labels: list[str]) -> dict[str, float]:
    tp = fp = tn = fn = 0
    for p, t in zip(preds, labels):
        positive_truth = t != "no"
        if p == "yes":
            tp += positive_truth
            fp += not positive_truth
        else:
            tn += not positive_truth
            fn += positive_truth
    precision = float(tp) / float(tp + fp) if tp + fp else 0.0
    recall = float(tp) / float(tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": f1, "accuracy": (tp + tn) / (tp + tn + fp + fn), "precision": precision, "recall": recall,
            "yes_ratio": preds.count("yes") / len(preds), "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def score_pope(answers: list[Answer], annotations: str | Path, categories: dict[Any, str]) -> Scores:
    """POPE per category (accuracy, precision, recall, F1, yes-ratio; yes = positive) and ``f1``, the mean F1 over
    the categories, the published figure. ``annotations`` is the folder of ``coco_pope_{category}.json`` files
    (JSONL with a ``label`` per line); ``categories`` maps each question_id to its category (from the questions
    file). As in the reference, the k-th answer of a category is scored against the k-th label of its file; answers
    whose question is not their label's are counted (``questions_not_matching_labels``) and logged."""
    folder = Path(annotations)
    if not folder.is_dir():
        raise DataError(f"POPE annotations: '{folder}' is not a folder (expected the folder of coco_pope_*.json)")
    files = sorted(folder.glob("coco_pope_*.json"))
    if not files:
        raise DataError(f"POPE annotations: no coco_pope_*.json in '{folder}'")
    grouped: dict[str, list[Answer]] = defaultdict(list)
    for a in answers:
        if a.question_id not in categories:
            raise DataError(f"{a.where}: question_id {a.question_id!r} is not in the POPE questions file")
        grouped[categories[a.question_id]].append(a)
    unknown = set(grouped) - {f.stem[len("coco_pope_"):] for f in files}
    if unknown:
        raise DataError(f"POPE answers of category '{sorted(unknown)[0]}' but '{folder}' has no "
                        f"coco_pope_{sorted(unknown)[0]}.json")
    per_category, n, failed, mismatched = {}, 0, 0, 0
    for file in files:
        category = file.stem[len("coco_pope_"):]
        cat_answers = grouped.get(category)
        if not cat_answers:
            continue
        rows = read_jsonl_objects(file, "POPE annotations")
        if len(cat_answers) > len(rows):
            raise DataError(f"{cat_answers[len(rows)].where}: more '{category}' answers than labels in {file}")
        labels = []
        for a, (line, row) in zip(cat_answers, rows):
            if "label" not in row:
                raise DataError(f"{file}, line {line}: no 'label'")
            question = row.get("text")
            if isinstance(question, str) and a.prompt and _words(a.prompt)[:len(_words(question))] != _words(question):
                mismatched += 1
                if mismatched == 1:
                    logger.warning("%s: the question %r is not %s, line %d's %r: POPE answers are matched to labels "
                                   "in file order (as the reference does), so this file is out of order or from "
                                   "another question file", a.where, a.prompt.splitlines()[0], file, line, question)
            labels.append(row["label"])
        per_category[category] = _pope_metrics([pope_label(a.text) for a in cat_answers], labels)
        per_category[category]["n"] = len(cat_answers)
        n += len(cat_answers)
    f1s = [v["f1"] for v in per_category.values()]
    metrics = {"f1": sum(f1s) / len(f1s)}
    for key in ("accuracy", "precision", "recall", "yes_ratio"):
        metrics[key] = sum(v[key] for v in per_category.values()) / len(per_category)
    return Scores("pope", metrics, per_category, n=n, failed_to_parse=failed,
                  extra={"questions_not_matching_labels": mismatched})


def _words(text: str) -> list[str]:
    return text.lower().split()


# ---------------------------------------------------------------- MME

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
_MME_SUFFIX = "Answer the question using a single word or phrase."
_YES_NO = " Please answer yes or no."


def mme_label(text: str) -> str:
    """``yes`` / ``no`` when the lower-cased answer is exactly that; else ``yes`` if ``yes`` is in its first four
    characters, then ``no`` likewise; else ``other`` (always wrong)."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def read_mme_truth(folder: str | Path) -> dict[tuple[str, str, str], str]:
    """``(subtask, image stem + .txt, question) -> yes/no`` from the MME benchmark folder
    (``MME_Benchmark_release_version``): each subtask has ``questions_answers_YES_NO/*.txt`` (or ``*.txt`` beside its
    images) with ``question<TAB>answer`` lines."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"MME annotations: '{root}' is not a folder (expected MME_Benchmark_release_version)")
    truth = {}
    for task_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        qa = task_dir / "questions_answers_YES_NO"
        qa = qa if (task_dir / "images").is_dir() and qa.is_dir() else task_dir
        for file in sorted(qa.glob("*.txt")):
            for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.strip().split("\t")
                if len(parts) != 2:
                    raise DataError(f"{file}, line {number}: expected 'question<TAB>answer'")
                truth[(task_dir.name, file.name, parts[0])] = parts[1]
    if not truth:
        raise DataError(f"MME annotations: no question files under '{root}'")
    return truth


def _mme_question(prompt: str) -> str:
    """The MME question as its files spell it, from a LLaVA prompt (suffix removed, " Please answer yes or no."
    put back)."""
    if _MME_SUFFIX in prompt:
        prompt = prompt.replace(_MME_SUFFIX, "").strip()
    if "Please answer yes or no." not in prompt:
        prompt += _YES_NO
    return prompt


def score_mme(answers: list[Answer], annotations: str | Path) -> Scores:
    """MME: per subtask acc (over questions), acc+ (images with both questions right) and score = 100 acc +
    100 acc+; ``perception`` and ``cognition`` are the sums over their subtasks present in the answers. An answer's
    ``question_id`` is ``subtask/image``; its prompt gives the question."""
    truth = read_mme_truth(annotations)
    tasks: dict[str, dict[str, list[tuple[str, str]]]] = defaultdict(lambda: defaultdict(list))
    for a in answers:
        qid = str(a.question_id)
        task, stem = qid.split("/")[0], qid.split("/")[-1].split(".")[0]
        file = stem + ".txt"
        question = _mme_question(a.prompt)
        gt = truth.get((task, file, question))
        if gt is None:  # a few MME questions have two spaces before the suffix
            gt = truth.get((task, file, question.replace(_YES_NO, " " + _YES_NO)))
        if gt is None:
            raise DataError(f"{a.where}: question_id {a.question_id!r} with question {question!r} is not in the MME "
                            f"folder {annotations} (answers of another benchmark?)")
        if gt.lower() not in ("yes", "no"):
            raise DataError(f"{annotations}/{task}: the answer of {question!r} is {gt!r}, not Yes or No")
        tasks[task][file].append((gt.lower(), mme_label(a.text)))
    unknown = set(tasks) - set(MME_PERCEPTION) - set(MME_COGNITION)
    if unknown:
        raise DataError(f"MME answers of subtask '{sorted(unknown)[0]}', which is not one of MME's 14")
    per_category, totals, n, other = {}, {}, 0, 0
    for group, names in (("perception", MME_PERCEPTION), ("cognition", MME_COGNITION)):
        total = 0
        for name in names:
            if name not in tasks:
                continue
            pairs = [p for image in tasks[name].values() for p in image]
            right = sum(gt == pred for gt, pred in pairs)
            acc = right / len(pairs)
            acc_plus = sum(all(gt == pred for gt, pred in image) for image in tasks[name].values()) / len(tasks[name])
            score = 0 + acc * 100 + acc_plus * 100
            total += score
            n += len(pairs)
            other += sum(pred == "other" for _, pred in pairs)
            per_category[name] = {"score": score, "acc": acc * 100, "acc_plus": acc_plus * 100, "n": len(pairs),
                                  "group": group}
        totals[group] = total
    missing = [t for t in (*MME_PERCEPTION, *MME_COGNITION) if t not in tasks]
    return Scores("mme", totals, per_category, n=n, failed_to_parse=other, extra={"missing_subtasks": missing})
