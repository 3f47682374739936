"""Judge-scored benchmarks - LLaVA-Bench (in-the-wild) and MM-Vet - through any OpenAI-compatible chat-completions
endpoint. Replies are cached on disk (a rerun asks nothing), a failed request is retried, the API key is read from
an environment variable and never written anywhere.

LLaVA-Bench follows the reference's review prompt structure and score parsing (``eval_gpt_review_bench.py``,
``summarize_gpt_review.py``): the judge scores the reference answer (Assistant 1) and ours (Assistant 2) 1-10 on the
first line of its reply; a reply that is not exactly two numbers there counts as ``[-1, -1]``; the relative score is
``round(mean(ours) / mean(reference) * 100, 1)`` of the means rounded to 3 places. MM-Vet asks for a 0.0-1.0
correctness; a reply that is not such a number is asked again (up to 5 times, the temperature raised by 0.5 each
time, as MM-Vet's grader does) and then counts 0.0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path

from ..errors import DataError, JudgeError, UsageError
from ..files import write_text_atomic
from .answers import Answer, Scores, read_json_file, read_jsonl_objects

logger = logging.getLogger(__name__)

__all__ = ["JudgeClient", "judge_correctness", "llava_bench_prompt", "parse_correctness", "parse_pair", "score_judged",
           "summarise_pairs"]

SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."

# Our wording of the reference's per-category review rule (its text is in llava/eval/table/rule.json; pass that file
# as --judge-rules to use it verbatim).
_RULE = ("We would like to request your feedback on the performance of two AI assistants in response to the user "
         "question displayed above. The user asks the question about an image{what}. For your reference, the visual "
         "content of the image is given above as a few sentences describing it, with the objects in it.\n"
         "Please rate the helpfulness, relevance, accuracy and level of detail of their responses. Each assistant "
         "receives an overall score on a scale of 1 to 10, where a higher score means better overall performance.\n"
         "Please first output a single line containing only two values indicating the scores for Assistant 1 and 2, "
         "respectively. The two scores are separated by a space.\nIn the subsequent line, please provide a "
         "comprehensive explanation of your evaluation, avoiding any potential bias and ensuring that the order in "
         "which the responses were presented does not affect your judgment.")
DEFAULT_RULES = {
    "llava_bench_conv": {"role": "Assistant", "prompt": _RULE.format(what=" in a conversation")},
    "llava_bench_detail": {"role": "Assistant", "prompt": _RULE.format(what=", asking for a detailed description")},
    "llava_bench_complex": {"role": "Assistant", "prompt": _RULE.format(what=" that needs reasoning about it")},
}

# MM-Vet: our few-shot table prompt (MM-Vet's grader uses the same structure with its own examples).
MMVET_PROMPT = (
    "Compare the ground truth with the prediction of an AI model and give the prediction a correctness score. In the "
    "ground truth, <AND> means the prediction is fully right only if it contains every element, <OR> means any one "
    "element is enough. The score is one of 0.0 (wrong), 0.1, 0.2, ..., 0.9, 1.0 (fully right). Reply with the score "
    "only, completing the last cell of the table.\n\n"
    "Question | Ground truth | Prediction | Correctness\n--- | --- | --- | ---\n"
    "What is 3 + 4? | 7 | 3 + 4 = 7 | 1.0\n"
    "What is 3 + 4? | 7 | 3 + 4 = 8 | 0.0\n"
    "Which fruits are on the plate? | apple <AND> pear | There is an apple. | 0.5\n"
    "Which fruits are on the plate? | apple <AND> pear | An apple and a pear. | 1.0\n"
    "What colour could the car be? | red <OR> orange | It is orange. | 1.0\n"
    "What does the sign say? | STOP | The sign says SLOW. | 0.0\n"
)


class JudgeClient:
    """An OpenAI-compatible chat-completions endpoint (``url`` is its base, e.g. ``https://api.openai.com/v1``).

    Requests are retried on connection errors, 429 and 5xx (``retries`` times, ``wait`` seconds apart, doubling);
    4xx other than 429 fail at once. The key comes from the environment variable ``key_env`` (no header without it).
    """

    def __init__(self, url: str, model: str, *, key_env: str = "OPENAI_API_KEY", runs: int = 1,
                 rules: str | Path | None = None, retries: int = 5, wait: float = 1.0, timeout: float = 120.0):
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"--judge-url: '{url}' is not an http(s) URL")
        self.endpoint = url.rstrip("/") + ("" if url.rstrip("/").endswith("/chat/completions") else
                                           "/chat/completions")
        self.model = model
        self.key_env = key_env
        self.runs = runs
        self.rules = _read_rules(rules) if rules else DEFAULT_RULES
        self.retries = retries
        self.wait = wait
        self.timeout = timeout
        self.requests = 0  # sent over the network (cache hits excluded)

    def __repr__(self) -> str:  # no key here, ever
        return f"JudgeClient({self.endpoint!r}, model={self.model!r})"

    def ask(self, messages: list[dict], temperature: float, max_tokens: int, cache: Path | None,
            tag: str = "") -> str:
        """The judge's reply text (from the cache when this exact request was answered before)."""
        request = {"model": self.model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
        file = None
        if cache is not None:
            digest = hashlib.sha256(json.dumps([request, tag], sort_keys=True).encode()).hexdigest()[:32]
            file = cache / f"{digest}.json"
            if file.is_file():
                try:
                    return json.loads(file.read_text(encoding="utf-8"))["reply"]
                except (ValueError, KeyError):
                    pass  # a damaged cache entry is asked again
        reply = self._post(request)
        if file is not None:
            write_text_atomic(file, json.dumps({"request": request, "tag": tag, "reply": reply}))
        return reply

    def _post(self, body: dict) -> str:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body).encode()
        delay = self.wait
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                logger.warning("judge %s: %s; retrying in %.1f s (%d/%d)", self.endpoint, problem, delay, attempt,
                               self.retries)
                time.sleep(delay)
                delay *= 2
            self.requests += 1
            req = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")  # noqa: S310
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as response:  # noqa: S310 - http(s) checked
                    payload = response.read()
            except urllib.error.HTTPError as e:
                problem = f"HTTP {e.code}"
                if e.code == 429 or e.code >= 500:
                    continue
                raise JudgeError(f"judge {self.endpoint} refused the request: HTTP {e.code} {e.reason}"
                                 + (f" (is ${self.key_env} set?)" if e.code in (401, 403) else "")) from None
            except (urllib.error.URLError, OSError) as e:
                problem = f"cannot connect ({getattr(e, 'reason', e)})"
                continue
            return _reply_text(payload)
        raise JudgeError(f"judge {self.endpoint}: {problem} after {self.retries + 1} attempts")


def _reply_text(payload: bytes) -> str:
    """The message text of a chat-completions response; '' for a response without one (then scored as malformed)."""
    try:
        content = json.loads(payload)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return ""
    return content if isinstance(content, str) else ""


def _read_rules(path: str | Path) -> dict:
    rules = read_json_file(path, dict, "a rule file (llava/eval/table/rule.json)")
    for cat in DEFAULT_RULES:
        rule = rules.get(cat)
        if not isinstance(rule, dict) or not isinstance(rule.get("prompt"), str) or "role" not in rule:
            raise DataError(f"{path}: no '{cat}' rule with 'role' and 'prompt'")
    return rules


# ---------------------------------------------------------------- LLaVA-Bench

def parse_pair(review: str) -> list[float]:
    """The two scores on the first line of a review (commas read as spaces); ``[-1, -1]`` unless exactly two
    numbers separated by single spaces."""
    try:
        parts = review.split("\n")[0].replace(",", " ").split(" ")
        if len(parts) == 2:
            return [float(parts[0]), float(parts[1])]
    except ValueError:
        pass
    return [-1, -1]


def llava_bench_prompt(context: str, question: str, reference: str, answer: str, rule: dict) -> str:
    role = rule["role"]
    return (f"[Context]\n{context}\n\n[Question]\n{question}\n\n[{role} 1]\n{reference}\n\n[End of {role} 1]\n\n"
            f"[{role} 2]\n{answer}\n\n[End of {role} 2]\n\n[System]\n{rule['prompt']}\n\n")


def summarise_pairs(pairs: list[list[float]]) -> dict[str, float]:
    import numpy as np

    mean = [round(x, 3) for x in np.asarray(pairs).mean(0).tolist()]
    return {"relative": round(mean[1] / mean[0] * 100, 1), "reference": round(mean[0] * 10, 1),
            "model": round(mean[1] * 10, 1)}


def _score_llava_bench(answers: list[Answer], folder: Path, questions: str | Path | None, judge: JudgeClient,
                       cache: Path | None) -> Scores:
    if not folder.is_dir():
        raise DataError(f"llava-bench annotations: '{folder}' is not a folder (expected llava-bench-in-the-wild with "
                        "context.jsonl and answers_gpt4.jsonl)")
    qfile = Path(questions) if questions else folder / "questions.jsonl"
    qs = {row["question_id"]: (n, row) for n, row in read_jsonl_objects(qfile, "questions file")}
    contexts = {row.get("image"): row for _, row in read_jsonl_objects(folder / "context.jsonl", "context file")}
    refs = {row.get("question_id"): row for _, row in read_jsonl_objects(folder / "answers_gpt4.jsonl",
                                                                         "reference answers")}
    per_run: list[dict[str, list]] = []
    reviews = []
    for run in range(judge.runs):
        scores: dict[str, list] = defaultdict(list)
        for a in answers:
            if a.question_id not in qs or a.question_id not in refs:
                raise DataError(f"{a.where}: question_id {a.question_id!r} is not a LLaVA-Bench question of {qfile} "
                                "with a reference answer")
            line, q = qs[a.question_id]
            ctx = contexts.get(q.get("image"))
            if ctx is None:
                raise DataError(f"{qfile}, line {line}: image {q.get('image')!r} has no context in "
                                f"{folder / 'context.jsonl'}")
            caption = "\n".join(ctx["caption"]) if isinstance(ctx.get("caption"), list) else str(ctx.get("caption"))
            category = "llava_bench_" + str(q.get("category"))
            if category not in judge.rules:
                raise DataError(f"{qfile}, line {line}: category {q.get('category')!r} has no judge rule")
            content = llava_bench_prompt(caption, q["text"], refs[a.question_id]["text"], a.text,
                                         judge.rules[category])
            review = judge.ask([{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}],
                               temperature=0.2, max_tokens=1024, cache=cache, tag=f"run{run}")
            pair = parse_pair(review)
            scores[category].append(pair)
            scores["all"].append(pair)
            reviews.append({"run": run, "question_id": a.question_id, "category": category, "content": review,
                            "tuple": pair})
        per_run.append(scores)
    runs = [{k: summarise_pairs(v) for k, v in sorted(s.items())} for s in per_run]
    mean = {k: round(sum(r[k]["relative"] for r in runs) / len(runs), 1) for k in runs[0]}
    per_category = {k.removeprefix("llava_bench_"): {"relative": v, **({"runs": [r[k]["relative"] for r in runs]})}
                    for k, v in mean.items() if k != "all"}
    failed = sum(1 for r in reviews if r["tuple"] == [-1, -1] and r["run"] == 0)
    if cache is not None:
        # One file per judge run, in the reference's review format: its summarize_gpt_review.py reads them.
        for run in range(judge.runs):
            write_text_atomic(cache.parent / f"reviews_{run + 1}.jsonl",
                              "".join(json.dumps({k: v for k, v in r.items() if k != "run"}) + "\n"
                                      for r in reviews if r["run"] == run))
    return Scores("llava-bench", {"relative": mean["all"]}, per_category, n=len(answers), failed_to_parse=failed,
                  extra={"runs": [r["all"] for r in runs], "judge_model": judge.model})


# ---------------------------------------------------------------- MM-Vet

def parse_correctness(reply: str) -> float | None:
    """The first word of the reply as a score in [0, 1], or None."""
    try:
        score = float(reply.split(" ")[0].strip())
    except ValueError:
        return None
    return score if 0.0 <= score <= 1.0 else None


def judge_correctness(items: list[tuple[Answer, str, str, list[str]]], judge: JudgeClient,
                      cache: Path | None) -> tuple[list[float], dict[str, float], dict[str, int], int]:
    """MM-Vet's grading of ``(answer, question, ground truth, capabilities)`` items: per-run mean x 100 (one per
    judge run), per-capability means (x 100, averaged over runs), capability counts, replies never parsed."""
    runs, failed, per_cap_runs = [], 0, []
    counts: dict[str, int] = defaultdict(int)
    for run in range(judge.runs):
        scores, caps = [], defaultdict(list)
        for a, question, truth, capabilities in items:
            row = " | ".join([question, truth.replace("<AND>", " <AND> ").replace("<OR>", " <OR> "), a.text, ""])
            messages = [{"role": "user", "content": MMVET_PROMPT + row}]
            score = None
            for attempt in range(5):
                reply = judge.ask(messages, temperature=0.5 * attempt, max_tokens=3, cache=cache,
                                  tag=f"run{run}-try{attempt}")
                score = parse_correctness(reply)
                if score is not None:
                    break
            if score is None:
                failed += run == 0
                score = 0.0
            scores.append(score)
            for cap in capabilities:
                caps[cap].append(score)
        runs.append(sum(scores) / len(scores) * 100)
        per_cap_runs.append({c: sum(v) / len(v) * 100 for c, v in caps.items()})
        counts = {c: len(v) for c, v in caps.items()}
    per_cap = {c: sum(r[c] for r in per_cap_runs) / len(per_cap_runs) for c in sorted(per_cap_runs[0])}
    return runs, per_cap, counts, failed


def _score_mm_vet(answers: list[Answer], path: Path, judge: JudgeClient, cache: Path | None) -> Scores:
    truth = read_json_file(path, dict, "MM-Vet annotations (mm-vet.json)")
    items = []
    for a in answers:
        item = truth.get(a.question_id)
        if not isinstance(item, dict) or "answer" not in item:
            raise DataError(f"{a.where}: question_id {a.question_id!r} is not in {path}")
        items.append((a, item.get("question", ""), item["answer"], list(item.get("capability", []))))
    runs, per_cap, counts, failed = judge_correctness(items, judge, cache)
    per_category = {c: {"score": v, "n": counts[c]} for c, v in per_cap.items()}
    return Scores("mm-vet", {"total": sum(runs) / len(runs)}, per_category, n=len(answers), failed_to_parse=failed,
                  extra={"runs": runs, "judge_model": judge.model})


def score_judged(benchmark: str, answers: list[Answer], annotations: str | Path, questions: str | Path | None,
                 judge: JudgeClient, cache_dir: str | Path | None = None) -> Scores:
    """Score ``llava-bench`` or ``mm-vet`` answers with the judge; replies are cached under ``cache_dir``."""
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    if benchmark == "llava-bench":
        return _score_llava_bench(answers, Path(annotations), questions, judge, cache)
    if benchmark == "mm-vet":
        return _score_mm_vet(answers, Path(annotations), judge, cache)
    raise UsageError(f"{benchmark} is not judge-scored")
