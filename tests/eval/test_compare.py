"""``eval compare`` and ``eval score`` from the command line: the table beside the published figures, the chart,
exit codes and messages for bad files."""

from __future__ import annotations

import json

from lora_llava.cli import main as cli


def _scores(folder, **scores):
    folder.mkdir(parents=True)
    (folder / "scores.json").write_text(json.dumps(scores))
    return folder


def test_compare_prints_published_figures_and_draws_a_chart(tmp_path, capsys):
    a = tmp_path / "run-a"
    _scores(a / "eval" / "gqa", benchmark="gqa", accuracy=61.25, n=10)
    _scores(a / "eval" / "pope", benchmark="pope", f1=0.8512, accuracy=0.86, n=30)
    b = _scores(tmp_path / "run-b-gqa", benchmark="gqa", accuracy=58.5, n=10)
    assert cli.main(["eval", "compare", str(a), str(b), "--plot", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("gqa", "pope"))}
    # ours per run, then LLaVA-1.5 7B full / 13B full / 7B LoRA / 13B LoRA (docs/MODEL_ZOO.md)
    assert lines["gqa"][1:] == ["accuracy", "61.25", "58.50", "62.0", "63.3", "63.0", "63.3"]
    assert lines["pope"][1:] == ["f1", "85.12", "-", "85.9", "85.9", "86.4", "86.7"]
    assert "MODEL_ZOO.md" in out
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_score_cli_names_the_bad_line_and_exits_1(tmp_path, capsys):
    ann = tmp_path / "testdev_balanced_questions.json"
    ann.write_text(json.dumps({"q1": {"answer": "dog"}}))
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"question_id": "q1", "text": "dog"}) + "\n"
                       + json.dumps({"question_id": "q7", "text": "cat"}) + "\n")
    code = cli.main(["eval", "score", "--benchmark", "gqa", "--answers", str(answers), "--annotations", str(ann),
                     "--out", str(tmp_path / "s.json")])
    assert code == 1
    assert "answers.jsonl, line 2: question_id 'q7'" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()
    # Judge benchmarks without a judge, and annotations missing: command errors (exit 2).
    assert cli.main(["eval", "score", "--benchmark", "textvqa", "--answers", str(answers),
                     "--out", str(tmp_path / "s.json")]) == 2
    assert "--annotations is needed" in capsys.readouterr().err
