"""The judge path (llava-bench, mm-vet) against a scripted OpenAI-compatible server on localhost: the reference's
prompt structure, a retry after a 500, a malformed reply counted as -1, replies cached, the key never written."""

from __future__ import annotations

import json
import logging

import pytest
from judge_server import ScriptedJudge  # tests/eval/judge_server.py (pytest puts tests/eval on the path)

from lora_llava.cli import main as cli
from lora_llava.eval.judge import parse_correctness, parse_pair

KEY = "sk-test-very-secret-42"


@pytest.mark.parametrize("review, pair", [
    ("8 6\nAssistant 1 is better", [8.0, 6.0]), ("7,7\nsame", [7.0, 7.0]), ("9 8.5", [9.0, 8.5]),
    ("eight seven\n", [-1, -1]), ("8  6", [-1, -1]),   # two spaces: three pieces
    ("Scores: 8 6", [-1, -1]), ("", [-1, -1]),
])
def test_pair_parsing(review, pair):
    assert parse_pair(review) == pair


def test_correctness_parsing():
    assert parse_correctness("0.5") == 0.5 and parse_correctness("1.0 (right)") == 1.0
    assert parse_correctness("1.5") is None and parse_correctness("abc") is None


def _llava_bench(tmp_path):
    folder = tmp_path / "llava-bench"
    folder.mkdir()
    cats = ["conv", "detail", "complex"]
    (folder / "questions.jsonl").write_text("".join(
        json.dumps({"question_id": i, "image": f"{i}.jpg", "text": f"Question {i}?", "category": c}) + "\n"
        for i, c in enumerate(cats)))
    (folder / "context.jsonl").write_text("".join(
        json.dumps({"id": f"{i}", "image": f"{i}.jpg", "caption": [f"Caption {i}.", "Second line."]}) + "\n"
        for i in range(3)))
    (folder / "answers_gpt4.jsonl").write_text("".join(
        json.dumps({"question_id": i, "text": f"Reference answer {i}."}) + "\n" for i in range(3)))
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": i, "prompt": f"Question {i}?", "text": f"Ours {i}.",
                                           "answer_id": "a", "model_id": "m", "metadata": {}}) + "\n"
                               for i in range(3)))
    return folder, answers


def test_llava_bench_through_a_local_server(tmp_path, monkeypatch, caplog, capsys):
    folder, answers = _llava_bench(tmp_path)
    monkeypatch.setenv("LORA_LLAVA_TEST_KEY", KEY)
    out = tmp_path / "out" / "scores.json"
    script = [(500, ""), (200, "8 6\nAssistant 1 is more detailed."), (200, "7,7\nBoth fine."),
              (200, "eight seven\nnot numbers")]
    with ScriptedJudge(script) as server, caplog.at_level(logging.DEBUG):
        argv = ["eval", "score", "--benchmark", "llava-bench", "--answers", str(answers), "--annotations", str(folder),
                "--out", str(out), "--judge-url", server.url, "--judge-model", "judge-1",
                "--judge-key-env", "LORA_LLAVA_TEST_KEY"]
        assert cli.main(argv) == 0
        sent = list(server.requests)
        assert len(sent) == 4                       # the 500 was retried
        first = sent[1]["body"]
        assert sent[1]["path"] == "/v1/chat/completions" and sent[1]["headers"]["Authorization"] == f"Bearer {KEY}"
        assert first["model"] == "judge-1" and first["temperature"] == 0.2
        assert first["messages"][0] == {"role": "system", "content": "You are a helpful and precise assistant for "
                                                                     "checking the quality of the answer."}
        user = first["messages"][1]["content"]
        assert user.startswith("[Context]\nCaption 0.\nSecond line.\n\n[Question]\nQuestion 0?\n\n"
                               "[Assistant 1]\nReference answer 0.\n\n[End of Assistant 1]\n\n"
                               "[Assistant 2]\nOurs 0.\n\n[End of Assistant 2]\n\n[System]\n")
        # A rerun is answered from the cache: nothing is sent.
        assert cli.main(argv) == 0
        assert len(server.requests) == 4
    scores = json.loads(out.read_text())
    # pairs [8, 6], [7, 7], [-1, -1]: means 4.667 / 4.0 -> 85.7; conv 75.0, detail 100.0, complex -1/-1 -> 100.0
    assert scores["relative"] == 85.7 and scores["failed_to_parse"] == 1
    assert {k: v["relative"] for k, v in scores["per_category"].items()} == {"complex": 100.0, "conv": 75.0,
                                                                              "detail": 100.0}
    printed = capsys.readouterr()
    everything = printed.out + printed.err + caplog.text + "".join(
        p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file())
    assert KEY not in everything


def test_mm_vet_asks_again_then_counts_zero(tmp_path):
    truth = {"v1_0": {"question": "What is 2+2?", "answer": "4", "capability": ["math"]},
             "v1_1": {"question": "Colour?", "answer": "red<OR>orange", "capability": ["rec"]},
             "v1_2": {"question": "Text?", "answer": "STOP", "capability": ["ocr", "rec"]}}
    ann = tmp_path / "mm-vet.json"
    ann.write_text(json.dumps(truth))
    answers = tmp_path / "a.jsonl"
    answers.write_text("".join(json.dumps({"question_id": q, "prompt": "p", "text": "x"}) + "\n" for q in truth))
    script = [(200, "0.5"), (200, "abc"), (200, "1.0")] + [(200, "no idea")] * 5
    with ScriptedJudge(script) as server:
        assert cli.main(["eval", "score", "--benchmark", "mm-vet", "--answers", str(answers), "--annotations",
                         str(ann), "--out", str(tmp_path / "s.json"), "--judge-url", server.url,
                         "--judge-model", "j"]) == 0
        temperatures = [r["body"]["temperature"] for r in server.requests]
    assert temperatures == [0.0, 0.0, 0.5, 0.0, 0.5, 1.0, 1.5, 2.0]
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["total"] == pytest.approx(50.0) and scores["failed_to_parse"] == 1
    assert scores["per_category"]["rec"]["score"] == pytest.approx(50.0)


def test_custom_with_a_judge(tmp_path):
    held = tmp_path / "held.json"
    held.write_text(json.dumps([{"id": f"r{i}", "conversations": [{"from": "human", "value": f"<image>\nQ{i}?"},
                                                                  {"from": "gpt", "value": "A red circle."}]}
                                for i in range(2)]))
    answers = tmp_path / "a.jsonl"
    answers.write_text("".join(json.dumps({"question_id": f"r{i}", "prompt": f"Q{i}?", "text": t}) + "\n"
                               for i, t in enumerate(["A red circle.", "A blue one."])))
    with ScriptedJudge([(200, "1.0"), (200, "0.2")]) as server:
        assert cli.main(["eval", "score", "--benchmark", "custom", "--answers", str(answers), "--annotations",
                         str(held), "--out", str(tmp_path / "s.json"), "--judge-url", server.url,
                         "--judge-model", "j"]) == 0
        asked = server.requests[1]["body"]["messages"][0]["content"]
    assert asked.endswith("\nQ1? | A red circle. | A blue one. | ")
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["vqa_match"] == 50.0 and scores["judge"] == pytest.approx(60.0)


def test_judge_runs_are_averaged(tmp_path):
    folder, answers = _llava_bench(tmp_path)
    out = tmp_path / "s.json"
    # run 1: pairs [8, 4], [8, 8], [8, 6] -> 75.0; run 2: all [8, 8] -> 100.0; published style: the mean, 87.5
    script = [(200, "8 4"), (200, "8 8"), (200, "8 6")] + [(200, "8 8")] * 3
    with ScriptedJudge(script) as server:
        assert cli.main(["eval", "score", "--benchmark", "llava-bench", "--answers", str(answers), "--annotations",
                         str(folder), "--out", str(out), "--judge-url", server.url, "--judge-model", "j",
                         "--judge-runs", "2"]) == 0
        assert len(server.requests) == 6
    scores = json.loads(out.read_text())
    reviews = [[json.loads(x)["tuple"] for x in (out.parent / f"reviews_{r}.jsonl").read_text().splitlines()]
               for r in (1, 2)]
    assert reviews == [[[8.0, 4.0], [8.0, 8.0], [8.0, 6.0]], [[8.0, 8.0]] * 3]
    assert scores["runs"] == [{"relative": 75.0, "reference": 80.0, "model": 60.0},
                              {"relative": 100.0, "reference": 80.0, "model": 80.0}]
    assert scores["relative"] == 87.5
    assert scores["per_category"]["conv"] == {"relative": 75.0, "runs": [50.0, 100.0]}


def test_judged_run_without_a_judge_stops_before_loading(tmp_path):
    from lora_llava.errors import UsageError
    from lora_llava.eval.runner import run_eval

    folder, _ = _llava_bench(tmp_path)
    with pytest.raises(UsageError, match="--judge-url"):
        run_eval("/nonexistent-model", "llava-bench", folder / "questions.jsonl", tmp_path / "out",
                 annotations=folder)
