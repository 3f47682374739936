"""Model FLOPs of a QLoRA LLaVA training step, and the GPU peaks that MFU divides by.

The same formula for every configuration: model FLOPs (activation-checkpointing recompute NOT counted, so the MFU of
the train-step benchmark is model-FLOPs utilisation, below hardware utilisation) against the GPU's dense bf16 peak:

  per sample of S tokens (its 576 image tokens included), language model, frozen NF4 weights:
      (4 * (N_lin + V * d) + 6 * N_lora) * S  +  6 * L * d * S^2
    N_lin = L * (2 d^2 + 2 d d_kv + 3 d I) linear weights, V * d the LM head (counted at every position),
    4 = forward 2 + input-gradient 2 (frozen weights need no weight gradient); 6 * N_lora: LoRA forward, input- and
    weight-gradient (stage 2; 0 in stage 1); 6 L d S^2: causal attention, forward 2 L d S^2 + backward 4 L d S^2.
  per image: frozen CLIP forward over P = 577 positions for the L_v - 1 layers LLaVA uses (feature layer -2):
      2 * P * (L_v - 1) * (4 dv^2 + 2 dv Iv)  +  4 * (L_v - 1) * dv * P^2  +  2 * 576 * (3 * 14^2 * dv)
  plus the trained projector: 576 * (4 * dv * d + 6 * d^2) (forward + weight gradients, input gradient of linear_2).

With the 6 * N convention of full fine-tuning the language-model part would be 1.5x larger.
"""

from __future__ import annotations

PEAK_TFLOPS = [(("H200",), 989), (("H100", "PCIe"), 756), (("H100",), 989), (("A100",), 312), (("L40S",), 362),
               (("4090",), 165), (("3090",), 71)]  # dense bf16, no sparsity


def param_counts(s: dict, stage: int, r: int) -> dict:
    """Parameter counts of shape ``s``: language-model linears, LM head, LoRA (rank ``r``, stage 2 only), one CLIP
    layer, projector."""
    d, i, kv = s["hidden"], s["intermediate"], s["hidden"] // s["heads"] * s["kv_heads"]
    dv, iv = s["vision_hidden"], s["vision_intermediate"]
    lora = s["layers"] * r * (2 * (d + d) + 2 * (d + kv) + 2 * (d + i) + (i + d)) if stage == 2 else 0
    return {"lin": s["layers"] * (2 * d * d + 2 * d * kv + 3 * d * i), "head": s["vocab"] * d, "lora": lora,
            "vision_layer": 4 * dv * dv + 2 * dv * iv, "projector": dv * d + d * d}


def step_flops(s: dict, stage: int, r: int, lengths: list[int], images: int) -> float:
    """Model FLOPs of one training step on samples of ``lengths`` tokens with ``images`` images."""
    n = param_counts(s, stage, r)
    d, dv = s["hidden"], s["vision_hidden"]
    tokens = (s["image_size"] // s["patch_size"]) ** 2
    per_token = 4 * (n["lin"] + n["head"]) + 6 * n["lora"]
    llm = sum(per_token * x + 6 * s["layers"] * d * x * x for x in lengths)
    p, lv = tokens + 1, s["vision_layers"] - 1
    vision = 2 * p * lv * n["vision_layer"] + 4 * lv * dv * p * p + 2 * tokens * 3 * s["patch_size"] ** 2 * dv
    projector = tokens * (4 * dv * d + 6 * d * d)
    return llm + images * (vision + projector)


def peak_tflops(device: str, override: float | None) -> float | None:
    """The dense bf16 peak of the GPU named ``device`` (``override`` when given), None when unknown."""
    if override:
        return override
    for keys, tflops in PEAK_TFLOPS:
        if all(k.lower() in device.lower() for k in keys):
            return tflops
    return None
