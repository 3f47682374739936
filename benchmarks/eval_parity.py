"""Do lora-llava's scorers give the LLaVA reference's numbers, to the last digit? Generates benchmark files and answer
files full of the answers the parsers disagree about (seeded), scores them with lora-llava and with the reference's own
scorer code (llava-torch 1.2.2.post1 = haotian-liu/LLaVA, installed in another Python environment), and compares the
full-precision values.

    python -m benchmarks.eval_parity --reference-python /path/to/llava-venv/bin/python [--seed 0] [--keep DIR]

Covered: the VQA answer normaliser (m4c_evaluator.EvalAIAnswerProcessor), TextVQA and VQAv2 accuracy
(TextVQAAccuracyEvaluator; eval_textvqa.py's prompt parsing and matching), POPE (eval_pope.py), ScienceQA
(eval_science_qa.py) and the LLaVA-Bench summary (summarize_gpt_review.py). GQA's and MME's scorers are not in the
reference package (they come with the GQA and MME downloads) and are covered by hand-made tests only.
Exit code 0 when every value is equal, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

# Run by the reference's Python: its scorer modules are loaded from their files (importing the llava package would
# load torch and the model code), then each is applied to the generated files; prints one JSON object.
REFERENCE_DRIVER = r'''
import contextlib, importlib.util, io, json, os, runpy, sys
import llava
EVAL = os.path.join(os.path.dirname(llava.__file__), "eval")
def load(name):
    spec = importlib.util.spec_from_file_location("ref_" + name, os.path.join(EVAL, name + ".py"))
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); return module
sys.modules["llava.eval.m4c_evaluator"] = m4c = load("m4c_evaluator")
root = sys.argv[1]
out = {}
proc = m4c.EvalAIAnswerProcessor()
out["normalise"] = [proc(t) for t in json.load(open(os.path.join(root, "normalise.json")))]
textvqa = load("eval_textvqa")
ann = json.load(open(os.path.join(root, "textvqa", "TextVQA_0.5.1_val.json")))["data"]
ann = {(a["image_id"], a["question"].lower()): a for a in ann}
res = [json.loads(l) for l in open(os.path.join(root, "textvqa", "answers.jsonl"))]
preds = [{"pred_answer": r["text"],
          "gt_answers": ann[(r["question_id"], textvqa.prompt_processor(r["prompt"]))]["answers"]} for r in res]
with contextlib.redirect_stderr(io.StringIO()):
    out["textvqa"] = 100. * m4c.TextVQAAccuracyEvaluator().eval_pred_list(preds)
vqa = json.load(open(os.path.join(root, "vqav2", "annotations.json")))["annotations"]
vqa = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in vqa}
res = [json.loads(l) for l in open(os.path.join(root, "vqav2", "answers.jsonl"))]
with contextlib.redirect_stderr(io.StringIO()):
    out["vqav2"] = 100. * m4c.TextVQAAccuracyEvaluator().eval_pred_list(
        [{"pred_answer": r["text"], "gt_answers": vqa[r["question_id"]]} for r in res])
def run(script, *args):
    buf = io.StringIO()
    argv = sys.argv
    sys.argv = [script, *args]
    try:
        with contextlib.redirect_stdout(buf):
            runpy.run_path(os.path.join(EVAL, script), run_name="__main__")
    finally:
        sys.argv = argv
    return buf.getvalue()
text = run("eval_pope.py", "--annotation-dir", os.path.join(root, "pope", "ann"), "--question-file",
           os.path.join(root, "pope", "questions.jsonl"), "--result-file", os.path.join(root, "pope", "answers.jsonl"))
pope, cat = {}, None
for line in text.splitlines():
    if line.startswith("Category: "):
        cat = line.split(",")[0][len("Category: "):]; pope[cat] = {}
    for key, name in (("Accuracy: ", "accuracy"), ("Precision: ", "precision"), ("Recall: ", "recall"),
                      ("F1 score: ", "f1"), ("Yes ratio: ", "yes_ratio")):
        if line.startswith(key):
            pope[cat][name] = float(line[len(key):])
out["pope"] = pope
sqa = os.path.join(root, "sqa")
run("eval_science_qa.py", "--base-dir", sqa, "--result-file", os.path.join(sqa, "answers.jsonl"), "--output-file",
    os.path.join(sqa, "ref_out.json"), "--output-result", os.path.join(sqa, "ref_result.json"))
result = json.load(open(os.path.join(sqa, "ref_result.json")))
detail = json.load(open(os.path.join(sqa, "ref_out.json")))
mm_c = len([x for x in detail["correct"] if x["is_multimodal"]])
mm_i = len([x for x in detail["incorrect"] if x["is_multimodal"]])
out["scienceqa"] = {"accuracy": result["acc"], "img_accuracy": mm_c / (mm_c + mm_i) * 100}
text = run("summarize_gpt_review.py", "-f", os.path.join(root, "llava-bench", "reviews.jsonl"))
out["llava-bench"] = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()[1:]
                      if line and not line.startswith("=")}
print(json.dumps(out))
'''

VOCAB = ["yes", "no", "Yes", "two", "2", "the dog", "a dog", "dog", "dogs", "red", "Red.", "coca cola", "coca-cola",
         "dont know", "don't know", "10", "ten", "3.5", "1,000", "1000", "nike", "NIKE!", "stop", "the stop sign",
         "none", "0", "it's red", "its red", "mr. smith", "mr smith", "x-ray", "xray", "(c)", "c", "a/b", "2.",
         "t-shirt", "50%", "3:00", "somebody'd", "youre", "Im", "well, yes", "x - y", "e-mail", "@home", "\"q\""]
POPE_TEXTS = ["Yes", "No", "yes", "no", "No.", "Yes, there is a dog.", "There is no dog.", "not", "Not really", "NO",
              "No, there is not.", "I think so. No wait", "There is a dog, not a cat.", "no.", "Yes.\nNo", "No,",
              "nope", "Yes there is no", "", "The answer is no", "Noted.", "yes no"]
SQA_TEXTS = ["A", "B", "C", "D", "E", "F", "A. cat", "B. dog", "C.dog", "The answer is B.", "The answer is C!",
             "The answer is A. The answer is B.", "b", "A.", "E. x", "I think the answer is D because", "", "AB",
             "The answer is Z.", "B. ", "D. no"]


def _jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _answer(qid, prompt, text):
    return {"question_id": qid, "prompt": prompt, "text": text, "answer_id": "a", "model_id": "m", "metadata": {}}


def generate(root: Path, seed: int) -> None:
    """Benchmark files and answer files (tricky answers on purpose) under ``root``."""
    rng = random.Random(seed)
    pieces = VOCAB + ["\n", "\t", " ;", "; ", "1..2", "pi.", "b." * 40]
    (root / "normalise.json").write_text(json.dumps(
        [" ".join(rng.choice(pieces) for _ in range(rng.randint(1, 6))) for _ in range(3000)]))
    # TextVQA: LLaVA's question files use the image id as question_id; four prompt shapes.
    data, answers = [], []
    suffix = "\nAnswer the question using a single word or phrase."
    for i in range(500):
        img, q = f"img{i // 2:04d}", (f"What is written on thing {i}?" if i % 3 else f"what IS on Thing {i}")
        gts = [rng.choice(VOCAB[:12]) if rng.random() < .5 else rng.choice(VOCAB) for _ in range(10)]
        data.append({"image_id": img, "question": q, "answers": gts, "question_id": 1000 + i})
        prompt = [f"{q}\nReference OCR token: A, B{suffix}", f"{q}{suffix}", f"Reference OCR token: A\n{q}{suffix}",
                  f"OCR tokens: a b Question: {q} Short answer:"][i % 4]
        answers.append(_answer(img, prompt, rng.choice(gts) if rng.random() < .6 else rng.choice(VOCAB)))
    (root / "textvqa").mkdir(parents=True, exist_ok=True)
    (root / "textvqa" / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": data}))
    _jsonl(root / "textvqa" / "answers.jsonl", answers)
    anns = [{"question_id": i, "answer_type": rng.choice(["yes/no", "number", "other"]),
             "answers": [{"answer": rng.choice(VOCAB), "answer_id": j + 1} for j in range(10)]} for i in range(400)]
    (root / "vqav2").mkdir(parents=True, exist_ok=True)
    (root / "vqav2" / "annotations.json").write_text(json.dumps({"annotations": anns}))
    _jsonl(root / "vqav2" / "answers.jsonl",
           [_answer(a["question_id"], "q", rng.choice([x["answer"] for x in a["answers"]] + VOCAB)) for a in anns])
    # POPE: three category files, one question file with categories, answers in question order.
    qs, ans, qid = [], [], 0
    for cat in ("adversarial", "popular", "random"):
        labels = []
        for k in range(100):
            qid += 1
            text = f"Is there a thing{k} in the image?"
            labels.append({"question_id": k + 1, "image": f"i{k}.jpg", "text": text,
                           "label": rng.choice(["yes", "no"])})
            qs.append({"question_id": qid, "image": f"i{k}.jpg", "text": text + suffix, "category": cat})
            ans.append(_answer(qid, text + suffix, rng.choice(POPE_TEXTS)))
        _jsonl(root / "pope" / "ann" / f"coco_pope_{cat}.json", labels)
    _jsonl(root / "pope" / "questions.jsonl", qs)
    _jsonl(root / "pope" / "answers.jsonl", ans)
    # ScienceQA: some problems unanswered (FAILED in the reference), half with images.
    problems, split, ans = {}, [], []
    for i in range(400):
        pid, n = str(i + 1), rng.randint(2, 5)
        problems[pid] = {"question": "q", "choices": [f"c{j}" for j in range(n)], "answer": rng.randrange(n)}
        split.append(pid)
        if i % 17 != 5:
            prompt = ("<image>\n" if rng.random() < .5 else "") + "Q?\nA. x\nB. y\nAnswer with the option's letter " \
                "from the given choices directly."
            ans.append(_answer(pid, prompt, rng.choice(SQA_TEXTS)))
    (root / "sqa").mkdir(parents=True, exist_ok=True)
    (root / "sqa" / "problems.json").write_text(json.dumps(problems))
    (root / "sqa" / "pid_splits.json").write_text(json.dumps({"test": split, "val": []}))
    _jsonl(root / "sqa" / "answers.jsonl", ans)
    # LLaVA-Bench: judge reviews (score pairs, malformed ones as [-1, -1]) in the reference's review format.
    reviews = []
    for i in range(60):
        pair = [-1, -1] if i % 13 == 0 else [float(rng.randint(1, 10)), float(rng.randint(1, 10))]
        category = "llava_bench_" + ("conv", "detail", "complex")[i % 3]
        reviews.append({"id": i + 1, "question_id": i, "category": category, "content": "", "tuple": pair})
    _jsonl(root / "llava-bench" / "reviews.jsonl", reviews)


def ours(root: Path) -> dict:
    from lora_llava.eval.benchmarks import score_answers
    from lora_llava.eval.judge import summarise_pairs
    from lora_llava.eval.normalize import normalize_answer

    out = {"normalise": [normalize_answer(t) for t in json.loads((root / "normalise.json").read_text())]}
    out["textvqa"] = score_answers("textvqa", root / "textvqa" / "answers.jsonl",
                                   root / "textvqa" / "TextVQA_0.5.1_val.json").metrics["accuracy"]
    out["vqav2"] = score_answers("vqav2", root / "vqav2" / "answers.jsonl",
                                 root / "vqav2" / "annotations.json").metrics["accuracy"]
    pope = score_answers("pope", root / "pope" / "answers.jsonl", root / "pope" / "ann",
                         root / "pope" / "questions.jsonl")
    keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    out["pope"] = {cat: {k: v[k] for k in keys} for cat, v in pope.per_category.items()}
    sqa = score_answers("scienceqa", root / "sqa" / "answers.jsonl", root / "sqa")
    out["scienceqa"] = {k: sqa.metrics[k] for k in ("accuracy", "img_accuracy")}
    by_cat: dict = {}
    for line in (root / "llava-bench" / "reviews.jsonl").read_text().splitlines():
        r = json.loads(line)
        by_cat.setdefault(r["category"], []).append(r["tuple"])
        by_cat.setdefault("all", []).append(r["tuple"])
    out["llava-bench"] = {k: summarise_pairs(v)["relative"] for k, v in sorted(by_cat.items())}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-python", required=True, help="a Python with llava-torch installed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", help="write the generated files here (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        generate(root, args.seed)
        proc = subprocess.run([args.reference_python, "-c", REFERENCE_DRIVER, str(root)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 2
        reference = json.loads(proc.stdout.strip().splitlines()[-1])
        mine = ours(root)
    failures = 0
    norm_diff = sum(a != b for a, b in zip(mine.pop("normalise"), reference.pop("normalise")))
    print(f"{'normaliser (3000 strings)':<32} {'differing outputs':<18} {norm_diff}")
    failures += norm_diff != 0
    for bench in reference:
        flat_ref = reference[bench] if isinstance(reference[bench], dict) else {"": reference[bench]}
        flat_ours = mine[bench] if isinstance(mine[bench], dict) else {"": mine[bench]}
        for key, ref in flat_ref.items():
            for sub, r in (ref.items() if isinstance(ref, dict) else [("", ref)]):
                o = flat_ours[key][sub] if sub else flat_ours[key]
                ok = o == r
                failures += not ok
                verdict = "equal" if ok else "DIFFERENT"
                print(f"{bench + ' ' + key + ' ' + sub:<32} ours {o!r:<22} reference {r!r:<22} {verdict}")
    print("all equal" if not failures else f"{failures} different")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
