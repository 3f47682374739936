"""``lora-llava eval run | score | compare``: LLaVA-1.5's benchmarks on a run folder, checkpoint or export."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UsageError
from .common import positive_int

__all__ = ["cmd_eval", "eval_args"]

_BENCHMARKS = ("vqav2", "textvqa", "gqa", "scienceqa", "pope", "mme", "llava-bench", "mm-vet", "custom")


def _judge(args):
    if not getattr(args, "judge_url", None):
        return None
    from ..eval.judge import JudgeClient

    if not args.judge_model:
        raise UsageError("--judge-url needs --judge-model")
    return JudgeClient(args.judge_url, args.judge_model, key_env=args.judge_key_env, runs=args.judge_runs,
                       rules=args.judge_rules)


def _run(args) -> int:
    from ..eval.runner import run_eval

    if args.template is not None:
        from ..data import get_template

        try:
            get_template(args.template)
        except ValueError as e:
            raise UsageError(f"--template: {e}") from None
    judge = _judge(args)
    result = run_eval(args.path, args.benchmark, args.questions, args.out, image_folder=args.image_folder,
                      annotations=args.annotations, batch_size=args.batch_size, limit=args.limit,
                      max_new_tokens=args.max_new_tokens, model_id=args.model_id, template=args.template,
                      device=args.device, bits=args.bits, judge=judge)
    print(f"{result.written} answers written to {result.answers_file}"
          + (f" ({result.skipped} already there)" if result.skipped else ""))
    if result.scores is not None:
        print(result.scores.table())
        if args.benchmark == "custom":
            from ..eval.custom import accuracy_line

            print(accuracy_line(result.scores))
        print(f"scores: {result.scores_file}")
    return 0


def _score(args) -> int:
    from ..eval.answers import read_answers
    from ..eval.benchmarks import score_answers

    out = Path(args.out)
    if args.benchmark == "vqav2" and args.questions:
        from ..eval.vqa import write_vqav2_submission

        sub = out.with_name("vqav2_submission.json")
        info = write_vqav2_submission(read_answers(args.answers), args.questions, sub)
        print(f"VQAv2 submission: {sub} ({info['questions']} questions, {info['unanswered']} unanswered)")
        if args.annotations is None:
            return 0
    scores = score_answers(args.benchmark, args.answers, args.annotations, args.questions, judge=_judge(args),
                           cache_dir=out.parent / "judge_cache")
    scores.write(out)
    print(scores.table())
    print(f"scores: {out}")
    return 0


def _compare(args) -> int:
    from ..eval.compare import compare, format_compare, plot_compare

    table = compare(args.dirs)
    print(format_compare(table))
    if args.plot:
        print(f"chart: {plot_compare(table, args.plot)}")
    return 0


def cmd_eval(args) -> int:
    """Evaluate on LLaVA-1.5's benchmarks: 'eval run' answers a benchmark's questions (LLaVA's protocol: the run's
    template, greedy, 128 new tokens, pad-to-square images) into answers.jsonl and scores them; 'eval score' scores an
    existing LLaVA answer file (from any model) with the reference's rules; 'eval compare' tabulates and charts the
    scores of several runs beside the published LLaVA-1.5 figures. Exit code 0 on success, 1 on a bad file (named
    with its line), 2 on a bad command."""
    return {"run": _run, "score": _score, "compare": _compare}[args.eval_command](args)


def _judge_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("judge (llava-bench, mm-vet; also custom)")
    g.add_argument("--judge-url", metavar="URL",
                   help="an OpenAI-compatible endpoint, e.g. https://api.openai.com/v1 or http://localhost:8000/v1")
    g.add_argument("--judge-model", metavar="NAME", help="judge model name, e.g. gpt-4-0613")
    g.add_argument("--judge-key-env", default="OPENAI_API_KEY", metavar="VAR",
                   help="environment variable holding the API key (default OPENAI_API_KEY; the key is never logged)")
    g.add_argument("--judge-runs", type=positive_int, default=1, metavar="N",
                   help="judge each answer N times and average the scores (the published figures use 3)")
    g.add_argument("--judge-rules", metavar="RULE.json",
                   help="llava-bench: the reference's rule file (llava/eval/table/rule.json) for the judge prompts")


def eval_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_command", metavar="{run,score,compare}", required=True)
    run = sub.add_parser("run", help="answer a benchmark's questions with a run / checkpoint / export, then score",
                         description="Answer a benchmark's questions into OUT/answers.jsonl (resumable) and, with "
                                     "annotations, score them into OUT/scores.json.")
    run.add_argument("path", metavar="PATH", help="a lora-llava run folder, a checkpoint folder or a merge export")
    run.add_argument("--benchmark", required=True, choices=_BENCHMARKS)
    run.add_argument("--questions", required=True, metavar="Q",
                     help="the benchmark's question file (LLaVA JSONL; ScienceQA / custom: LLaVA JSON)")
    run.add_argument("--image-folder", metavar="DIR", help="folder the questions' image paths are under")
    run.add_argument("--annotations", metavar="A", help="ground truth to score against (see README per benchmark)")
    run.add_argument("--out", required=True, metavar="DIR", help="folder for answers.jsonl and scores.json")
    run.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                     help="questions per batch (left padding; same answers as batch size 1)")
    run.add_argument("--limit", type=positive_int, metavar="N", help="answer only the first N questions")
    run.add_argument("--max-new-tokens", type=positive_int, default=128, metavar="N",
                     help="longest answer in tokens (default 128, as LLaVA's eval)")
    run.add_argument("--template", metavar="NAME", help="conversation template (default: the run's, else vicuna_v1)")
    run.add_argument("--bits", type=int, choices=(4, 8, 16), help="quantize on load (default: as trained)")
    run.add_argument("--device", metavar="DEVICE", help="cpu, cuda:0, ... (default: the GPU when there is one)")
    run.add_argument("--model-id", metavar="ID", help="model_id in the answers (default: PATH's folder name)")
    _judge_args(run)
    score = sub.add_parser("score", help="score an existing LLaVA answer file",
                           description="Score a LLaVA answer file (any model's) with the reference's rules.")
    score.add_argument("--benchmark", required=True, choices=_BENCHMARKS)
    score.add_argument("--answers", required=True, metavar="A.jsonl", help="LLaVA answer file")
    score.add_argument("--annotations", metavar="A", help="ground truth (see README per benchmark)")
    score.add_argument("--questions", metavar="Q",
                       help="question file (POPE: gives categories; VQAv2: writes the test-dev submission)")
    score.add_argument("--out", required=True, metavar="scores.json", help="where to write the scores")
    _judge_args(score)
    comp = sub.add_parser("compare", help="table (and bar chart) of eval scores across runs",
                          description="Collect DIR/eval/*/scores.json (or DIR/scores.json) of each DIR and print a "
                                      "table beside the published LLaVA-1.5 figures.")
    comp.add_argument("dirs", nargs="+", metavar="DIR", help="run folders or eval output folders")
    comp.add_argument("--plot", metavar="PNG", help="write a bar chart here")
