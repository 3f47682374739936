"""The train-step benchmark's report: per (shape, stage, micro-batch) a table of every configuration side by side with
ratios to ``ours``, then the derived ratios, the goals of issue 7 and the projected wall time of the full LLaVA-1.5-7B
recipe."""

from __future__ import annotations

import statistics

from .checkpoint import shape_spec
from .flops import peak_tflops, step_flops
from .machine import GiB

STAGE_SAMPLES = {1: 558_128, 2: 665_298}  # blip_laion_cc_sbu_558k.json, llava_v1_5_mix665k.json
GLOBAL_BATCH = {1: 256, 2: 128}  # recipes/llava15_7b_pretrain.yaml, recipes/llava15_7b.yaml
GOAL_PEAK_GIB = {"7b": 10, "13b": 16}


def summarise(r: dict, peak_override: float | None) -> dict:
    """Step time, tokens/s, MFU, time per sample from a worker's step records."""
    timed = r["steps"][r["warmup"]:]
    wall = sum(x["wall"] for x in timed)
    s = shape_spec(r["shape"])
    flops = sum(step_flops(s, r["stage"], 128, x["lengths"], x["images"]) for x in timed)
    samples = sum(len(x["lengths"]) for x in timed)
    opt = statistics.median(x["optimizer"] for x in timed)
    peak = peak_tflops(r["device"], peak_override) if r["device"] != "cpu" else None
    return {"step_s": statistics.median(x["wall"] for x in timed), "tokens_s": sum(x["tokens"] for x in timed) / wall,
            "mfu": flops / wall / (peak * 1e12) if peak else None, "peak_tflops": peak, "tflops": flops / wall / 1e12,
            "sample_s": (wall - sum(x["optimizer"] for x in timed)) / samples + opt / GLOBAL_BATCH[r["stage"]],
            # The planner's sequence: the padded row, or (padding-free) the row's tokens per sample.
            "samples": samples, "max_row": max(-(-x["padded"] // len(x["lengths"])) for x in r["steps"]),
            "padding": 1 - sum(x["tokens"] for x in timed) / sum(x["padded"] for x in timed)}


def planner_check(r: dict) -> tuple[str, str]:
    """The planner's estimate for a result, and its ratio to the measured peak."""
    plan_bytes = r.get("plan_bytes")
    if plan_bytes is None:
        return "-", "-"
    est = f"{plan_bytes / GiB:.2f}"
    if r["device"] == "cpu":
        return est, "n/a (CPU RSS)"
    ratio = plan_bytes / r["peak_bytes"]
    return est, f"{ratio:.2f} ({'within' if abs(ratio - 1) <= 0.15 else 'outside'} 15%)"


def report(results: list[dict], configs: dict[str, str], peak_override: float | None) -> None:
    """Print the tables; ``configs``: each configuration's description, in the order of the rows."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:  # runs at several micro-batches (e.g. --from-json of several parts) get a table each
        groups.setdefault((r["shape"], r["stage"], r["batch"]), []).append(r)
    summaries = {}
    for (shape, stage, batch), rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        first = ok[0] if ok else rs[0]
        attn = ", ".join(sorted({r["attention"] for r in ok})) or "?"
        on_cpu = first.get("device") == "cpu"
        mem = "peak RSS GiB (CPU, whole process)" if on_cpu else "peak GPU GiB (max_memory_allocated)"
        print(f"\n## shape {shape}, stage {stage}: micro-batch {first['batch']}, seq {first['seq_len']}, "
              f"{first['timed_steps']} timed steps after {first['warmup']} warm-up, attention {attn}, "
              f"device {first.get('device', '?')}")
        print(f"| config | step s (median) | tokens/s | vs ours | {mem} | vs ours | MFU | planner GiB | "
              f"plan / measured | notes |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        base = next((r for r in ok if r["config"] == "ours"), None)
        bm = summarise(base, peak_override) if base else None
        for r in sorted(rs, key=lambda r: list(configs).index(r["config"])):
            label = f"{r['config']}: {configs[r['config']]}"
            if r["status"] != "ok":
                print(f"| {label} | {r['status']}: {r['reason']} | | | | | | | | |")
                continue
            m = summarise(r, peak_override)
            summaries[(shape, stage, batch, r["config"])] = (r, m)
            mfu = "n/a (CPU)" if on_cpu else f"{100 * m['mfu']:.1f}%" if m["mfu"] is not None else \
                "n/a (unknown GPU peak; --peak-tflops)"
            vs_t = f"{m['tokens_s'] / bm['tokens_s']:.2f}x" if bm else "-"
            vs_m = f"{r['peak_bytes'] / base['peak_bytes']:.2f}x" if base else "-"
            est, ratio = planner_check(r)
            notes = [f"optim {r['optimizer']}", f"trainables {r['trainable_dtype']}",
                     f"padding {100 * m['padding']:.0f}%", f"{m['tflops']:.3g} TFLOP/s"] + r.get("notes", [])
            if r["config"] == "trl":
                notes.append("the planner models lora-llava's loss and fp32 trainables, not TRL's")
            print(f"| {label} | {m['step_s']:.3f} | {m['tokens_s']:,.0f} | {vs_t} | {r['peak_bytes'] / GiB:.2f} | "
                  f"{vs_m} | {mfu} | {est} | {ratio} | {'; '.join(notes)} |")
    derived(summaries, results)


def derived(summaries: dict, results: list[dict]) -> None:
    """Ours / TRL ratios, the goals of issue 7, and the projected wall time of the full LLaVA-1.5-7B recipe."""
    print("\n## Derived")
    for (shape, stage, batch, config), (r, m) in sorted(summaries.items()):
        if config != "ours" or (shape, stage, batch, "trl") not in summaries:
            continue
        tr, tm = summaries[(shape, stage, batch, "trl")]
        at = "" if len({k[2] for k in summaries}) == 1 else f" micro-batch {batch}"
        print(f"- {shape} stage {stage}{at}: ours / TRL tokens/s {m['tokens_s'] / tm['tokens_s']:.2f}x, "
              f"peak memory {r['peak_bytes'] / tr['peak_bytes']:.2f}x")
    on_gpu = any(r.get("device", "cpu") != "cpu" for r in results if r["status"] == "ok")
    print("\nGoals (issue 7: GPU, stage 2, micro-batch 1, seq 2048, r=128):")
    if not on_gpu:
        print("- not evaluated: no GPU measurement in these results (the goals are for a GPU)")
    def ours(shape: str, stage: int, config: str = "ours"):
        """The result at micro-batch 1 (the goals' setting), else at the smallest micro-batch measured."""
        batches = sorted(k[2] for k in summaries if k[:2] == (shape, stage) and k[3] == config)
        return summaries[(shape, stage, batches[0], config)] if batches else None

    for shape in ("7b", "13b"):
        got = ours(shape, 2)
        if not got or got[0]["device"] == "cpu":
            print(f"- {shape}: not measured in this run")
            continue
        r, m = got
        setting = "" if (r["batch"], r["seq_len"]) == (1, 2048) else \
            f" (measured at micro-batch {r['batch']}, seq {r['seq_len']}: not the goal's setting)"
        peak, goal = r["peak_bytes"] / GiB, GOAL_PEAK_GIB[shape]
        print(f"- {shape} peak <= {goal} GiB: {peak:.2f} GiB, " + (
            "met" if peak <= goal else f"missed by {peak - goal:.2f} GiB ({100 * (peak / goal - 1):.0f}%)") + setting)
        if (shape, 2, r["batch"], "trl") in summaries:
            x = m["tokens_s"] / summaries[(shape, 2, r["batch"], "trl")][1]["tokens_s"]
            print(f"- {shape} tokens/s >= 2x TRL: {x:.2f}x, " + ("met" if x >= 2 else
                                                                f"missed by {100 * (1 - x / 2):.0f}%"))
        # H100 class: the H200 is the same chip with more memory (dense bf16 989 TFLOP/s on both datasheets).
        if any(k in r["device"] for k in ("H100", "H200")) and m["mfu"] is not None:
            print(f"- {shape} MFU >= 40% on an H100-class GPU ({r['device']}): {100 * m['mfu']:.1f}%, " + (
                "met" if m["mfu"] >= 0.4 else f"missed by {40 - 100 * m['mfu']:.1f} points"))
        else:
            print(f"- {shape} MFU >= 40% on an H100-class GPU: not evaluated ({r['device']})")
    for shape in ("7b", "tiny"):
        s1, s2 = ours(shape, 1), ours(shape, 2)
        if not (s1 and s2):
            continue
        hours = {st: STAGE_SAMPLES[st] * x[1]["sample_s"] / 3600 for st, x in ((1, s1), (2, s2))}
        what = "" if shape == "7b" else " (tiny shape: shows the computation only, not a LLaVA-1.5-7B figure)"
        print(f"\nProjected full LLaVA-1.5-7B recipe on {s2[0]['device']}{what}: stage 1 {STAGE_SAMPLES[1]:,} samples "
              f"x {s1[1]['sample_s'] * 1000:.1f} ms = {hours[1]:.1f} h, stage 2 {STAGE_SAMPLES[2]:,} x "
              f"{s2[1]['sample_s'] * 1000:.1f} ms = {hours[2]:.1f} h, total {hours[1] + hours[2]:.1f} h "
              f"(micro-batch {s1[0]['batch']} / {s2[0]['batch']} as measured, optimizer step once per global batch "
              f"{GLOBAL_BATCH[1]} / {GLOBAL_BATCH[2]}; the stage-1 recipe's micro-batch 16 would be faster per sample)")
        break
    else:
        print("\nProjected full LLaVA-1.5-7B recipe: needs the 7b shape measured in stages 1 and 2 (ours)")
