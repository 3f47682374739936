"""What the GPU run runs on: library versions and where they were imported from, the GPU, its measured ceilings, and
whether the carried packages work (bitsandbytes' CUDA library, flex attention, torch.compile's Triton).

    python -m benchmarks.gpu.env_check [--json OUT]

Ceilings (METHOD.md: measure them once in the run): a bf16 8192x8192x8192 matrix product on random data (median of
10 timed with CUDA events after 3 warm-ups) and a 2 GiB device-to-device copy (bytes read + written). Without CUDA
the same code runs on the CPU at small sizes (a dry run of the code path; the figures mean nothing).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import statistics
import time
import traceback
from pathlib import Path

MODULES = ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "bitsandbytes", "huggingface_hub",
           "tokenizers", "safetensors", "pyarrow", "numpy", "triton", "flash_attn", "liger_kernel")


def versions() -> dict:
    """``{module: "version (path)"}``, or why it does not import."""
    out = {}
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
            out[name] = f"{getattr(mod, '__version__', '?')} ({Path(mod.__file__).parent.parent})"
        except Exception as e:  # noqa: BLE001 - any import failure is a finding to report
            out[name] = f"not importable: {type(e).__name__}: {str(e)[:200]}"
    return out


def unmet_requirements(packages=("trl", "datasets", "bitsandbytes", "transformers", "peft", "accelerate")) -> list:
    """Requirements of the carried packages that the installed versions do not meet (extras ignored)."""
    from packaging.requirements import Requirement

    problems = []
    for pkg in packages:
        try:
            reqs = importlib.metadata.requires(pkg) or []
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{pkg}: not installed")
            continue
        for line in reqs:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = importlib.metadata.version(req.name)
            except importlib.metadata.PackageNotFoundError:
                problems.append(f"{pkg} needs {req}: missing")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                problems.append(f"{pkg} needs {req}: have {have}")
    return problems


def ceilings(cuda: bool) -> dict:
    """Measured bf16 matmul rate and copy bandwidth (CUDA), or the same code at small CPU sizes."""
    import torch

    dev = "cuda" if cuda else "cpu"
    n = 8192 if cuda else 512
    dtype = torch.bfloat16 if cuda else torch.float32
    a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))

    def timed(fn, reps: int, warm: int) -> float:
        for _ in range(warm):
            fn()
        times = []
        for _ in range(reps):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1000)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return statistics.median(times)

    mm = timed(lambda: a @ b, 10, 3)
    words = (2 * 2**30 if cuda else 2**24) // 2
    src = torch.randn(words, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    cp = timed(lambda: dst.copy_(src), 10, 3)
    ok = bool(torch.equal(dst, src))
    return {"matmul": f"{n}x{n}x{n} {str(dtype).removeprefix('torch.')}", "matmul_tflops": 2 * n**3 / mm / 1e12,
            "copy_bytes": 2 * src.numel() * 2, "copy_tb_s": 2 * src.numel() * 2 / cp / 1e12, "copy_correct": ok}


def probes(cuda: bool) -> dict:
    """Does a 4-bit layer run (bitsandbytes' library), and does flex attention compile and run."""
    import torch

    out = {}
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(256, 256, bias=False, compute_dtype=dtype, quant_type="nf4")
        layer = layer.to(dev)
        x = torch.randn(4, 256, device=dev, dtype=dtype)
        ref = x.float() @ bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float().t()
        err = float((layer(x).float() - ref).norm() / ref.norm())
        lib = getattr(getattr(bnb, "cextension", None), "BNB_BACKEND", "?")
        out["bitsandbytes_4bit"] = {"ok": err < 2e-2, "rel_err": err, "backend": lib}
    except Exception as e:  # noqa: BLE001 - reported, the run goes on
        out["bitsandbytes_4bit"] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        q, k, v = (torch.randn(1, 4, 256, 64, device=dev, dtype=dtype) for _ in range(3))
        mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, 1, 1, 256, 256, device=dev)
        t = time.perf_counter()
        got = torch.compile(flex_attention)(q, k, v, block_mask=mask)
        seconds = time.perf_counter() - t
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        err = float((got.float() - ref.float()).norm() / ref.float().norm())
        out["flex_attention"] = {"ok": err < 2e-2, "rel_err": err, "compile_and_run_s": seconds}
    except Exception as e:  # noqa: BLE001 - reported, the run goes on
        out["flex_attention"] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}",
                                 "trace": traceback.format_exc(limit=3)[-600:]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu.env_check", description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import torch

    from .._shared.machine import machine_line

    cuda = torch.cuda.is_available()
    result = {"machine": machine_line(cuda), "versions": versions(), "unmet_requirements": unmet_requirements(),
              "cuda": cuda, "torch_cuda": torch.version.cuda}
    if cuda:
        p = torch.cuda.get_device_properties(0)
        result["gpu"] = {"name": p.name, "memory_bytes": p.total_memory, "sms": p.multi_processor_count,
                         "capability": f"{p.major}.{p.minor}"}
    result["ceilings"] = ceilings(cuda)
    result["probes"] = probes(cuda)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(f"machine: {result['machine']}")
    for name, v in result["versions"].items():
        print(f"  {name}: {v}")
    print(f"unmet requirements of the carried packages: {result['unmet_requirements'] or 'none'}")
    c = result["ceilings"]
    print(f"ceilings{'' if cuda else ' (CPU, small sizes: a dry run, not figures)'}: matmul {c['matmul']} "
          f"{c['matmul_tflops']:.1f} TFLOP/s; copy {c['copy_bytes'] / 2**30:.1f} GiB moved at {c['copy_tb_s']:.3f} "
          f"TB/s (correct: {c['copy_correct']})")
    for name, p in result["probes"].items():
        print(f"probe {name}: {'ok' if p.get('ok') else 'FAILED'} "
              f"{json.dumps({k: v for k, v in p.items() if k not in ('ok', 'trace')})}")


if __name__ == "__main__":
    main()
