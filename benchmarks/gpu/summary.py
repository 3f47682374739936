"""The GPU run's figures in one place: ``summary.md`` (one table of every training configuration with the planner's
estimate beside each measured peak, MFU against the datasheet's 989 TFLOP/s and against the measured matmul ceiling;
the ratios to TRL; the goals; the checks) and ``checks.json`` (environment, step ledger, flex / export / pytest
checks), plus ``logs.tar.gz`` (worker logs, step logs). ``run.sh`` calls it after every step, so a run cut short
still brings back what it measured.

    python -m benchmarks.gpu.summary --work DIR --out DIR [TRAIN.json ...]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tarfile
from pathlib import Path

from .._shared.machine import GiB
from .._shared.step_report import GOAL_PEAK_GIB, summarise

DATASHEET_TFLOPS = 989  # H100 / H200 SXM dense bf16
KINDS_CEILING_TFLOPS = 790  # KINDS.md: 8192^3 bf16 matmul on random data, 769-798 TFLOP/s on this workplace's H200s


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def train_rows(files: list[Path]) -> list[dict]:
    rows = []
    for f in files:
        data = _read(f)
        for r in (data or {}).get("results", []):
            rows.append({**r, "file": f.name})
    return rows


def table(rows: list[dict], ceiling: float, ceiling_src: str) -> list[str]:
    out = [f"| file | shape | batch | config | status | peak GiB (GPU: max_memory_allocated; CPU: RSS) | planner GiB | "
           f"plan / measured | step s | tokens/s | TFLOP/s | MFU vs {DATASHEET_TFLOPS} | MFU vs {ceiling:.0f} "
           f"({ceiling_src}) | attention | notes |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        head = f"| {r['file']} | {r['shape']} | {r['batch']} | {r['config']} |"
        if r["status"] != "ok":
            out.append(f"{head} {r['status']}: {r.get('reason', '')[:160]} | | | | | | | | | | |")
            continue
        m = summarise(r, None)
        peak = r["peak_bytes"] / GiB
        plan = r.get("plan_bytes")
        ratio = f"{plan / r['peak_bytes']:.2f}" if plan and r["device"] != "cpu" else "n/a (CPU RSS)" if plan else "-"
        mfu = f"{100 * m['mfu']:.1f}%" if m["mfu"] is not None else "n/a"
        mfu2 = f"{100 * m['tflops'] / ceiling:.1f}%" if r["device"] != "cpu" else "n/a"
        notes = f"optim {r.get('optimizer')}; trainables {r.get('trainable_dtype')}; padding {100 * m['padding']:.0f}%"
        out.append(f"{head} ok | {peak:.2f} | {plan / GiB if plan else 0:.2f} | {ratio} | {m['step_s']:.3f} | "
                   f"{m['tokens_s']:,.0f} | {m['tflops']:.1f} | {mfu} | {mfu2} | {r.get('attention')} | {notes} |")
    return out


def derived(rows: list[dict]) -> list[str]:
    out = []
    ok = {(r["file"], r["shape"], r["batch"], r["config"]): r for r in rows if r["status"] == "ok"}
    for (f, shape, batch, config), r in sorted(ok.items()):
        if config != "ours":
            continue
        m = summarise(r, None)
        trl = ok.get((f, shape, batch, "trl"))
        if trl:
            t = summarise(trl, None)
            x = m["tokens_s"] / t["tokens_s"]
            goal = "CPU: the goal is for a GPU" if r["device"] == "cpu" else \
                "met" if x >= 2 else f"missed by {100 * (1 - x / 2):.0f}%"
            out.append(f"- {shape} micro-batch {batch}: ours / TRL tokens/s **{x:.2f}x** (goal >= 2x: {goal}), "
                       f"peak memory {r['peak_bytes'] / trl['peak_bytes']:.2f}x")
        if r["device"] != "cpu" and batch == 1 and shape in GOAL_PEAK_GIB:
            peak, goal = r["peak_bytes"] / GiB, GOAL_PEAK_GIB[shape]
            out.append(f"- {shape} peak {peak:.2f} GiB at the recipe settings (AdamW fp32 state, fp32 trainables); "
                       f"goal <= {goal} GiB: " + ("met" if peak <= goal else
                                                  f"missed by {peak - goal:.2f} GiB ({100 * (peak / goal - 1):.0f}%)"))
            if m["mfu"] is not None:
                pct = 100 * m["mfu"]
                out.append(f"- {shape} MFU {pct:.1f}% of {DATASHEET_TFLOPS} TFLOP/s (goal >= 40% on H100 class: "
                           f"{'met' if pct >= 40 else f'missed by {40 - pct:.1f} points'})")
    for (_f, shape, batch, config), r in sorted(ok.items()):
        if r["device"] != "cpu" and batch == 1 and shape in GOAL_PEAK_GIB and config in ("paged_adamw_8bit",
                                                                                        "bf16_trainables"):
            peak = r["peak_bytes"] / GiB
            out.append(f"- {shape} with {config}: peak {peak:.2f} GiB (goal <= {GOAL_PEAK_GIB[shape]} GiB: "
                       f"{'met' if peak <= GOAL_PEAK_GIB[shape] else 'missed'})")
    return out


def pytest_summary(log: Path) -> str | None:
    if not log.is_file():
        return None
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    final = [x for x in lines if re.search(r"\d+ (passed|failed|skipped|deselected|error)", x)]
    return final[-1].strip("= ") if final else (lines[-1] if lines else "empty log")


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu.summary", description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="run.sh's work folder")
    ap.add_argument("--out", type=Path, required=True, help="where summary.md, checks.json, logs.tar.gz go")
    ap.add_argument("train", nargs="*", type=Path, help="train_step --json files")
    args = ap.parse_args()
    env = _read(args.work / "env.json") or {}
    flex = _read(args.work / "flex-check.json")
    export = _read(args.work / "export-check.json")
    ledger = []
    if (args.work / "ledger.tsv").is_file():
        for line in (args.work / "ledger.tsv").read_text().splitlines():
            name, budget, seconds, code, status = line.split("\t")
            ledger.append({"step": name, "budget_s": float(budget), "seconds": float(seconds), "exit": code,
                           "status": status})
    pytest = pytest_summary(args.work / "pytest-gpu.log")
    measured = (env.get("ceilings") or {}).get("matmul_tflops") if env.get("cuda") else None
    ceiling, src = (measured, "measured in this run") if measured else (KINDS_CEILING_TFLOPS, "KINDS.md's H200")
    rows = train_rows([p for p in args.train if p.is_file()])

    md = ["# GPU run summary (benchmarks/gpu/run.sh)", "", f"Machine: {env.get('machine', '?')}", ""]
    if env:
        c = env.get("ceilings", {})
        md.append(f"Ceilings{'' if env.get('cuda') else ' (CPU dry run: not figures)'}: matmul {c.get('matmul')} "
                  f"{c.get('matmul_tflops', 0):.1f} TFLOP/s, copy {c.get('copy_tb_s', 0):.3f} TB/s. Probes: "
                  + ", ".join(f"{k} {'ok' if v.get('ok') else 'FAILED'}" for k, v in env.get("probes", {}).items())
                  + f". Unmet requirements: {env.get('unmet_requirements') or 'none'}.")
        md.append("")
    md += ["## Steps", "", "| step | budget s | seconds | exit | status |", "| --- | --- | --- | --- | --- |"]
    md += [f"| {s['step']} | {s['budget_s']:.0f} | {s['seconds']:.0f} | {s['exit']} | {s['status']} |" for s in ledger]
    md += ["", "## Training steps (stage 2, seq 2048 on the GPU, r=128, activation checkpointing)", ""]
    md += table(rows, ceiling, src) if rows else ["(no training result yet)"]
    md += ["", "## Derived", ""] + (derived(rows) or ["(nothing to derive yet)"])
    md += ["", "## Checks", ""]
    if flex:
        md.append(f"- padding-free kernels vs padded sdpa ({flex['device']}, {flex['dtype']}): "
                  f"{'OK' if flex['ok'] else 'FAILED'}: " + "; ".join(
                      f"{v['variant']} rel diff {v['logits_rel_diff']:.1e}" for v in flex["variants"]))
    if export:
        md.append(f"- merged tiny export, greedy tokens ({export['device']}): " + "; ".join(
            f"{c['what']} vs {c['against']} same tokens {c['same_tokens']}/{c['prompts']}"
            for c in export["comparisons"]))
    if pytest:
        md.append(f"- pytest -m gpu: {pytest}")
    text = "\n".join(md) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.md").write_text(text)
    checks = {"env": env, "ledger": ledger, "flex_check": flex, "export_check": export, "pytest_gpu": pytest,
              "mfu_ceiling_tflops": ceiling, "mfu_ceiling_source": src}
    (args.out / "checks.json").write_text(json.dumps(checks, indent=1))
    logs = sorted(p for p in args.work.rglob("*.log") if p.is_file() and p.stat().st_size < 8 * 2**20)
    tmp = args.work / "logs.tar.gz.tmp"  # built in the work folder: $OUT brings back at most 8 files
    with tarfile.open(tmp, "w:gz") as tar:
        for p in logs:
            tar.add(p, arcname=str(p.relative_to(args.work)))
    shutil.copyfile(tmp, args.out / "logs.tar.gz")
    tmp.unlink()
    print(text)


if __name__ == "__main__":
    main()
