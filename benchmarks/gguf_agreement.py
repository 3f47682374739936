"""Greedy answers of a GGUF export in llama.cpp (llama-cpp-python) against lora-llava's, at f16, q8_0 and q4_k_m.

For a run folder and its held-out data (LLaVA JSON, one question per record), the script answers every question with
``lora-llava chat``'s code on the run folder (the model as trained, 4-bit included) and on the hf merge (exactly the
weights the GGUF files carry; once more with CLIP's tokens in the order llama.cpp's LLaVA graph uses, llama.cpp
issue #25814), then merges the run to ``--format gguf`` at each quant type (``--from-dequantized`` for a
4-bit run) and answers with llama.cpp through llama-cpp-python's LLaVA-1.5 handler (mtmd) given the export's chat
template. It prints, per quant type, how many answers equal each reference.

Run from the repository root (the demo run: ``lora-llava sft recipes/demo.yaml`` first):

    python -m benchmarks.gguf_agreement runs/demo --data demo_data/eval.json --image-folder demo_data
"""

from __future__ import annotations

import argparse
import base64
import json
import tempfile
import time
from pathlib import Path

from ._shared.machine import command_line


def llama_cpp_answers(model_path: Path, mmproj: Path, questions: list[str], images: list[Path],
                      max_tokens: int, n_ctx: int = 1024, n_threads: int | None = None) -> list[str]:
    """Greedy answers of llama.cpp (llama-cpp-python's LLaVA-1.5 handler, given the export's own chat template
    instead of its built-in one) to one question about each image."""
    import llama_cpp
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=n_ctx, n_threads=n_threads, verbose=False, seed=0)
    handler = Llava15ChatHandler(clip_model_path=str(mmproj), verbose=False)
    handler.DEFAULT_SYSTEM_MESSAGE = None  # the export's template carries vicuna_v1's system prompt
    handler.CHAT_FORMAT = llm.metadata["tokenizer.chat_template"]
    llm.chat_handler = handler
    answers = []
    for question, path in zip(questions, images, strict=True):
        uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
        out = llm.create_chat_completion(
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                   {"type": "text", "text": question}]}],
            temperature=0.0, top_k=1, repeat_penalty=1.0, max_tokens=max_tokens)
        answers.append(out["choices"][0]["message"]["content"].strip())
    return answers


def cls_last_order(model):
    """Run ``model``'s CLIP embeddings in the token order of llama.cpp's LLaVA graph (llama.cpp issue #25814: the
    class token after the patches, position embeddings 0..n in that order); returns a function that undoes it."""
    import torch

    emb = next(m for m in model.modules() if type(m).__name__ == "CLIPVisionEmbeddings")
    original = emb.forward

    def forward(pixel_values, interpolate_pos_encoding=False, **_):
        patches = emb.patch_embedding(pixel_values.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = emb.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([patches, cls], dim=1) + emb.position_embedding(emb.position_ids)

    emb.forward = forward

    def undo() -> None:
        emb.forward = original

    return undo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--data", required=True, help="held-out LLaVA JSON (the first human turn of each record)")
    ap.add_argument("--image-folder", required=True)
    ap.add_argument("--limit", type=int, default=0, help="first N records only")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--quants", default="f16,q8_0,q4_k_m")
    args = ap.parse_args()

    from lora_llava.export.merge import merge
    from lora_llava.infer.generate import generate_answers
    from lora_llava.infer.load import load_for_inference
    from lora_llava.run.folder import RunFolder

    records = json.loads(Path(args.data).read_text())
    records = records[: args.limit] if args.limit else records
    questions = [r["conversations"][0]["value"].replace("<image>", "").strip() for r in records]
    images = [r["image"] for r in records]
    turns = [[("human", f"<image>\n{q}")] for q in questions]
    dequantized = RunFolder(Path(args.run_dir)).read_recipe().quant.bits == 4
    print(command_line("benchmarks.gguf_agreement"))
    with tempfile.TemporaryDirectory() as tmp:
        refs = {}
        for name, path in (("run", args.run_dir),
                           ("hf merge", merge(args.run_dir, Path(tmp) / "hf", dtype="fp32", progress=False,
                                              from_dequantized=dequantized).out)):
            loaded = load_for_inference(path)
            refs[name] = generate_answers(loaded.model, loaded.processor, turns, [[i] for i in images],
                                          args.image_folder, template=loaded.template,
                                          max_new_tokens=args.max_new_tokens)
            if name == "hf merge":
                undo = cls_last_order(loaded.model)
                refs["hf merge in llama.cpp's CLS order"] = generate_answers(
                    loaded.model, loaded.processor, turns, [[i] for i in images], args.image_folder,
                    template=loaded.template, max_new_tokens=args.max_new_tokens)
                undo()
            del loaded
        for quant in args.quants.split(","):
            t0 = time.perf_counter()
            out = merge(args.run_dir, Path(tmp) / f"gguf-{quant}", format="gguf", gguf_quant=quant,
                        from_dequantized=dequantized, progress=False).out
            size = (out / f"model-{quant}.gguf").stat().st_size
            t1 = time.perf_counter()
            theirs = llama_cpp_answers(out / f"model-{quant}.gguf", out / "mmproj-f16.gguf", questions,
                                       [Path(args.image_folder) / i for i in images], args.max_new_tokens)
            t2 = time.perf_counter()
            line = [f"{quant:7s} model {size / 1e6:7.2f} MB, merge {t1 - t0:5.1f} s, answers {t2 - t1:5.1f} s"]
            for name, ref in refs.items():
                same = sum(a == b for a, b in zip(ref, theirs, strict=True))
                line.append(f"= {name}: {same}/{len(ref)} ({same / len(ref):.1%})")
            print(" | ".join(line), flush=True)
            if quant == "f16":
                for q, a, b in zip(questions, refs["run"], theirs, strict=True):
                    if a != b:
                        print(f"    {q!r}: lora-llava {a!r} | llama.cpp {b!r}")


if __name__ == "__main__":
    main()
