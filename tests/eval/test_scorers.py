"""Each scorer on hand-made cases whose results were worked out by hand, the reference's quirks included."""

from __future__ import annotations

import json

import pytest

from lora_llava.errors import DataError
from lora_llava.eval.answers import read_answers
from lora_llava.eval.benchmarks import score_answers
from lora_llava.eval.closed import mme_label, pope_label, scienceqa_letter
from lora_llava.eval.normalize import normalize_answer, soft_scores, vqa_accuracy
from lora_llava.eval.vqa import textvqa_question


def write_answers(path, rows):
    path.write_text("".join(json.dumps({"question_id": q, "prompt": p, "text": t, "answer_id": "x", "model_id": "m",
                                        "metadata": {}}) + "\n" for q, p, t in rows))
    return path


@pytest.mark.parametrize("raw, normalised", [
    ("Two dogs", "2 dogs"),              # number words
    ("none", "0"),
    ("The cat.", "cat"),                 # articles, final period
    ("an apple", "apple"),
    ("dont know", "don't know"),         # contractions
    ("somebody'd", "somebodyd"),         # ... as the table has it
    ("it's red", "it 's red"),           # 's split off
    ("1,000", "1000"),                   # commas deleted first
    ("3.5", "3.5"),                      # a period before a digit stays
    ("2.", "2"),                         # the mistyped look-behind: a period after a digit goes
    ("a/b", "b"),                        # "/" between letters -> space; then the article "a" goes
    ("x - y", "x y"),                    # "-" next to a space is deleted
    ("Yes!", "yes"),
    ("t-shirt", "t shirt"),
    ("Hello\tWorld\n", "hello world"),
])
def test_vqa_normaliser(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_vqa_normaliser_removes_at_most_32_periods():
    # The reference passes re.UNICODE (32) as the substitution count.
    assert normalize_answer("b." * 40) == "b" * 32 + "b." * 8


def test_vqa_leave_one_out_accuracy():
    scores = soft_scores(["red"] * 2 + ["blue"] * 8)
    assert scores["red"] == pytest.approx(0.6)    # (2 x 1/3 + 8 x 2/3) / 10
    assert scores["blue"] == 1.0
    # Three matching humans give 0.9, not 1: leaving one of them out leaves two.
    assert vqa_accuracy("The Red.", ["red"] * 3 + [f"x{i}" for i in range(7)]) == pytest.approx(0.9)
    assert vqa_accuracy("green", ["red"] * 10) == 0.0


def test_textvqa_prompt_shapes():
    assert textvqa_question("What Is it?\nReference OCR token: A, B\nAnswer the question using a single word or "
                            "phrase.") == "what is it?"
    assert textvqa_question("Reference OCR token: A\nWhat?\nAnswer.") == "what?"
    assert textvqa_question("OCR tokens: a b Question: Who? Short answer:") == "who?"
    assert textvqa_question("Q?\nAnswer the question using a single word or phrase.") == "q?"
    assert textvqa_question("just one line") is None


def test_textvqa_scores_by_image_and_question(tmp_path):
    ann = tmp_path / "TextVQA_0.5.1_val.json"
    ann.write_text(json.dumps({"data": [
        {"image_id": "im1", "question": "What brand?", "question_id": 1, "answers": ["nike"] * 10},
        {"image_id": "im1", "question": "What colour?", "question_id": 2, "answers": ["red"] * 3 + ["x"] * 7},
    ]}))
    answers = write_answers(tmp_path / "a.jsonl", [
        ("im1", "What colour?\nAnswer the question using a single word or phrase.", "Red"),
        ("im1", "What brand?\nReference OCR token: NIKE\nAnswer the question using a single word or phrase.", "Nike."),
    ])
    scores = score_answers("textvqa", answers, ann)
    assert scores.metrics["accuracy"] == pytest.approx(95.0) and scores.n == 2   # (0.9 + 1) / 2


@pytest.mark.parametrize("text, label", [
    ("No", "no"), ("no.", "no"), ("No, there is not.", "no"), ("There is not a dog.", "no"),
    ("Not really", "yes"),             # capital "Not" is not one of the words
    ("NO", "yes"),
    ("nope", "yes"),
    ("Yes, there is no dog.", "no"),   # commas removed, first sentence only
    ("There is a dog. No cat.", "yes"),  # the second sentence is not read
    ("Yes", "yes"), ("", "yes"),
])
def test_pope_parsing(text, label):
    assert pope_label(text) == label


def test_pope_metrics(tmp_path):
    ann = tmp_path / "ann"
    ann.mkdir()
    labels = ["yes", "yes", "yes", "no"]
    (ann / "coco_pope_random.json").write_text("".join(
        json.dumps({"question_id": i + 1, "text": f"Is there a q{i}?", "label": lab}) + "\n"
        for i, lab in enumerate(labels)))
    (ann / "coco_pope_popular.json").write_text(json.dumps({"question_id": 1, "text": "Is there a p?",
                                                            "label": "no"}) + "\n")
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": 10 + i, "text": f"Is there a q{i}?\nAnswer.",
                                             "category": "random"}) + "\n" for i in range(4))
                         + json.dumps({"question_id": 20, "text": "Is there a p?", "category": "popular"}) + "\n")
    answers = write_answers(tmp_path / "a.jsonl", [(10 + i, f"Is there a q{i}?\nAnswer.", t)
                                                   for i, t in enumerate(["Yes", "No", "Yes.", "Yes"])]
                            + [(20, "Is there a p?", "No")])
    scores = score_answers("pope", answers, ann, questions)
    random = scores.per_category["random"]
    # preds yes, no, yes, yes against yes, yes, yes, no: TP 2, FN 1, FP 1, TN 0
    assert (random["tp"], random["fn"], random["fp"], random["tn"]) == (2, 1, 1, 0)
    assert random["precision"] == pytest.approx(2 / 3) and random["recall"] == pytest.approx(2 / 3)
    assert random["f1"] == pytest.approx(2 / 3) and random["accuracy"] == 0.5 and random["yes_ratio"] == 0.75
    popular = scores.per_category["popular"]
    assert popular["accuracy"] == 1.0 and popular["f1"] == 0.0   # no positives at all
    assert scores.metrics["f1"] == pytest.approx(1 / 3)          # mean over the categories present


@pytest.mark.parametrize("text, letter", [
    ("A", "A"), ("E", "E"), ("B. cat", "B"),
    ("C.dog", "FAILED"),                               # ". " must follow the letter
    ("The answer is B.", "B"), ("The answer is C!", "C"),  # any character after the letter
    ("The answer is A. The answer is B.", "FAILED"),   # more than one match
    ("F", "FAILED"), ("b", "FAILED"), ("AB", "FAILED"),
])
def test_scienceqa_parsing(text, letter):
    assert scienceqa_letter(text) == letter


def test_scienceqa_scores(tmp_path):
    problems = {"1": {"choices": ["x", "y"], "answer": 1}, "2": {"choices": ["x", "y", "z"], "answer": 0},
                "3": {"choices": ["x", "y"], "answer": 0}, "4": {"choices": ["x", "y", "z"], "answer": 2},
                "5": {"choices": ["x", "y"], "answer": 0}}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1", "2", "3", "4", "5"], "val": []}))
    img = "<image>\nQ\nAnswer with the option's letter from the given choices directly."
    answers = write_answers(tmp_path / "a.jsonl", [
        ("1", img, "B"),                     # right, IMG
        ("2", img, "The answer is A."),      # right, IMG
        ("3", "Q", "A. x"),                  # right, text
        ("4", img, "E"),                     # a letter beyond the choices: wrong
        # "5" unanswered: FAILED, counted wrong (and not IMG: its prompt is unknown)
    ])
    scores = score_answers("scienceqa", answers, tmp_path)
    assert scores.metrics["accuracy"] == pytest.approx(60.0)        # 3 / 5
    assert scores.metrics["img_accuracy"] == pytest.approx(200 / 3)  # 2 / 3
    assert scores.extra["missing"] == 1 and scores.failed_to_parse == 1
    limited = score_answers("scienceqa", answers, tmp_path, only={"1", "2", "3", "4"})
    assert limited.metrics["accuracy"] == pytest.approx(75.0)


def test_scienceqa_numeric_ids_are_named(tmp_path):
    (tmp_path / "problems.json").write_text(json.dumps({"4": {"choices": ["a", "b"], "answer": 0}}))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["4"]}))
    answers = write_answers(tmp_path / "a.jsonl", [(4, "Q", "A")])
    with pytest.raises(DataError, match=r"a\.jsonl, line 1: question_id 4 .*strings"):
        score_answers("scienceqa", answers, tmp_path)


def test_gqa_accuracy(tmp_path):
    ann = tmp_path / "testdev_balanced_questions.json"
    ann.write_text(json.dumps({"q1": {"answer": "dog", "types": {"structural": "query"}},
                               "q2": {"answer": "yes", "types": {"structural": "verify"}},
                               "q3": {"answer": "left", "types": {"structural": "query"}},
                               "q4": {"answer": "no", "types": {"structural": "logical"}}}))
    answers = write_answers(tmp_path / "a.jsonl", [("q1", "p", "Dog."), ("q2", "p", "Yes"), ("q3", "p", "Left side")])
    scores = score_answers("gqa", answers, ann)
    assert scores.metrics["accuracy"] == pytest.approx(200 / 3) and scores.n == 3
    assert scores.metrics["open"] == 50.0 and scores.metrics["binary"] == 100.0


@pytest.mark.parametrize("text, label", [
    ("Yes", "yes"), ("no", "no"), ("yes, it is", "yes"), ("No.", "no"),
    ("Not sure", "no"),        # "no" within the first four characters
    ("I think yes", "other"), ("nah", "other"), ("Uh, no", "other"),
])
def test_mme_parsing(text, label):
    assert mme_label(text) == label


def test_mme_scores(tmp_path):
    root = tmp_path / "MME"
    (root / "existence").mkdir(parents=True)     # images and question files side by side
    (root / "existence" / "001.txt").write_text("Is there a dog in this image? Please answer yes or no.\tYes\n"
                                                "Is there a cat in this image? Please answer yes or no.\tNo\n")
    (root / "existence" / "002.txt").write_text("Is there a car?  Please answer yes or no.\tYes\n"  # two spaces
                                                "Is there a bus? Please answer yes or no.\tNo\n")
    qa = root / "code_reasoning" / "questions_answers_YES_NO"
    qa.mkdir(parents=True)
    (root / "code_reasoning" / "images").mkdir()
    (qa / "0020.txt").write_text("Is the output 3? Please answer yes or no.\tYes\nIs the output 4? Please answer yes "
                                 "or no.\tNo\n")
    suffix = "\nAnswer the question using a single word or phrase."
    answers = write_answers(tmp_path / "a.jsonl", [
        ("existence/001.jpg", "Is there a dog in this image?" + suffix, "Yes"),
        ("existence/001.jpg", "Is there a cat in this image?" + suffix, "No"),
        ("existence/002.jpg", "Is there a car?" + suffix, "yes"),
        ("existence/002.jpg", "Is there a bus?" + suffix, "Yes"),
        ("code_reasoning/0020.png", "Is the output 3?" + suffix, "No"),
        ("code_reasoning/0020.png", "Is the output 4?" + suffix, "maybe"),
    ])
    scores = score_answers("mme", answers, root)
    ex = scores.per_category["existence"]
    assert ex["acc"] == 75.0 and ex["acc_plus"] == 50.0 and ex["score"] == 125.0
    assert scores.per_category["code_reasoning"]["score"] == 0.0
    assert scores.metrics == {"perception": 125.0, "cognition": 0.0}
    assert scores.failed_to_parse == 1 and "OCR" in scores.extra["missing_subtasks"]


def test_custom_scores(tmp_path):
    held = tmp_path / "eval.json"
    held.write_text(json.dumps([
        {"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nQ"},
                                                        {"from": "gpt", "value": "A red circle."}]},
        {"id": "b", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "Two"}]},
    ]))
    answers = write_answers(tmp_path / "a.jsonl", [("a", "Q", "red circle"), ("b", "Q", "Two")])
    scores = score_answers("custom", answers, held)
    assert scores.metrics == {"vqa_match": 100.0, "exact_match": 50.0}
    jsonl = tmp_path / "eval.jsonl"   # the same records, one a line
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in json.loads(held.read_text())))
    assert score_answers("custom", answers, jsonl).metrics == scores.metrics


def test_bad_answer_files_name_file_and_line(tmp_path):
    ann = tmp_path / "gqa.json"
    ann.write_text(json.dumps({"q1": {"answer": "dog"}}))
    answers = write_answers(tmp_path / "a.jsonl", [("q1", "p", "dog"), ("q9", "p", "cat")])
    with pytest.raises(DataError, match=r"a\.jsonl, line 2: question_id 'q9' is not in .*gqa\.json"):
        score_answers("gqa", answers, ann)
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"question_id": 1, "text": "x"}\n{"question_id": 2}\n')
    with pytest.raises(DataError, match=r"b\.jsonl, line 2: text"):
        read_answers(broken)
    # POPE answers scored as TextVQA: the first line that matches nothing is named.
    tv = tmp_path / "tv.json"
    tv.write_text(json.dumps({"data": [{"image_id": "i", "question": "q", "question_id": 5, "answers": ["a"] * 10}]}))
    pope = write_answers(tmp_path / "pope.jsonl", [(1, "Is there a dog?\nAnswer.", "Yes")])
    with pytest.raises(DataError, match=r"pope\.jsonl, line 1: question_id 1"):
        score_answers("textvqa", pope, tv)


def test_scores_equal_the_reference_scorers():
    """benchmarks/eval_parity.py: our scorers and the reference's own code (llava-torch in the reference
    virtualenv of tests/reference_env.py) on the same generated files."""
    from reference_env import reference_python

    from benchmarks.eval_parity import main

    assert main(["--reference-python", str(reference_python())]) == 0


def test_vqav2_scores_and_submission(tmp_path):
    from lora_llava.eval.vqa import write_vqav2_submission

    ann = tmp_path / "v2_mscoco_val2014_annotations.json"
    ann.write_text(json.dumps({"annotations": [
        {"question_id": 1, "answer_type": "number", "answers": [{"answer": "2"}] * 10},
        {"question_id": 2, "answer_type": "yes/no", "answers": [{"answer": "yes"}] * 2 + [{"answer": "no"}] * 8},
    ]}))
    answers = write_answers(tmp_path / "a.jsonl", [(1, "q", "Two."), (2, "q", "Yes")])
    scores = score_answers("vqav2", answers, ann)
    assert scores.metrics["accuracy"] == pytest.approx(80.0)   # (1 + 0.6) / 2
    assert scores.per_category["yes/no"]["accuracy"] == pytest.approx(60.0)
    questions = tmp_path / "test2015.jsonl"
    questions.write_text("".join(json.dumps({"question_id": q, "text": "q"}) + "\n" for q in (2, 3, 1)))
    info = write_vqav2_submission(read_answers(answers), questions, tmp_path / "sub.json")
    assert json.loads((tmp_path / "sub.json").read_text()) == [
        {"question_id": 2, "answer": "yes"}, {"question_id": 3, "answer": ""}, {"question_id": 1, "answer": "2"}]
    assert info == {"questions": 3, "unanswered": 1}


def test_pope_answers_out_of_label_order_are_reported(tmp_path, caplog):
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "coco_pope_random.json").write_text("".join(
        json.dumps({"question_id": i + 1, "text": f"Is there a q{i}?", "label": "yes"}) + "\n" for i in range(2)))
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "text": f"Is there a q{i}?", "category": "random"})
                                 + "\n" for i in range(2)))
    answers = write_answers(tmp_path / "a.jsonl", [(1, "Is there a q1?\nAnswer.", "Yes"),
                                                   (0, "Is there a q0?\nAnswer.", "No")])
    scores = score_answers("pope", answers, ann, questions)
    assert scores.extra["questions_not_matching_labels"] == 2
    assert "a.jsonl, line 1: the question 'Is there a q1?'" in caplog.text
