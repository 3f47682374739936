"""Multi-process launches: which engine runs the job, where the model loads, and what cannot work.

lora-llava does not launch processes itself: ``accelerate launch -m lora_llava sft RECIPE`` or
``torchrun --nproc_per_node N -m lora_llava sft RECIPE`` do, and the Trainer (through accelerate) runs DDP, DeepSpeed
or FSDP. This module reads what the launcher set (environment variables, the recipe's ``train.deepspeed`` /
``train.fsdp``), puts each process's model on its own GPU, and refuses the combinations that cannot work, before
any weights load.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from ..errors import DataError, LaunchError
from ..files import read_json

__all__ = ["Launch", "check_launch", "detect_launch", "device_map"]


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process was started."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    engine: str = "single"  # single | ddp | deepspeed | fsdp
    zero_stage: int | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        if self.engine == "deepspeed":
            return f"DeepSpeed ZeRO-{self.zero_stage if self.zero_stage is not None else '?'}"
        return {"single": "one process", "ddp": "DDP", "fsdp": "FSDP"}[self.engine]


def _zero_stage(recipe) -> int | None:
    """The ZeRO stage from accelerate's environment, or from the recipe's ``train.deepspeed`` (a file or a dict)."""
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage:
        return int(stage)
    ds: Any = recipe.train.deepspeed
    if isinstance(ds, str):
        path = Path(ds)
        if not path.is_file():
            raise LaunchError(f"train.deepspeed: '{ds}' does not exist (a DeepSpeed JSON config)")
        try:
            ds = read_json(path)
        except DataError as e:
            raise LaunchError(f"train.deepspeed: {e}") from None
    if isinstance(ds, dict):
        stage = ds.get("zero_optimization", {}).get("stage")
        return int(stage) if isinstance(stage, (int, str)) and str(stage).isdigit() else None
    return None


def detect_launch(recipe) -> Launch:
    """Read world size, ranks and engine from what ``torchrun`` / ``accelerate launch`` set, and the recipe."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if recipe.train.deepspeed or _env_true("ACCELERATE_USE_DEEPSPEED"):
        engine = "deepspeed"
    elif recipe.train.fsdp or _env_true("ACCELERATE_USE_FSDP"):
        engine = "fsdp"
    elif world > 1:
        engine = "ddp"
    else:
        engine = "single"
    return Launch(world, rank, local, engine, _zero_stage(recipe) if engine == "deepspeed" else None)


def check_launch(recipe, launch: Launch, cuda: bool | None = None) -> list[str]:
    """Problems of running ``recipe`` under ``launch``; empty when the combination works.

    What works: one process, DDP (torchrun or ``accelerate launch`` with ``recipes/accelerate/ddp.yaml``) and
    DeepSpeed ZeRO-1/2 (``zero2.yaml``), each process holding a whole (4-bit) replica on its own GPU. Engines that
    shard the weights themselves (ZeRO-3, FSDP) are refused: lora-llava reads and writes the LoRA and projector
    weights as whole tensors (checkpoints, resume, the projector of stage 1), which sharded parameters are not.
    """
    import importlib.util

    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    bits = recipe.quant.bits
    sharded = ("lora-llava saves, resumes and loads the projector from whole (unsharded) LoRA and projector weights; "
               "use DDP (recipes/accelerate/ddp.yaml) or DeepSpeed ZeRO-2 (recipes/accelerate/zero2.yaml) instead")
    p = []
    if launch.engine == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            p.append("DeepSpeed is configured but not installed: pip install deepspeed")
        if not cuda:
            p.append("DeepSpeed needs CUDA GPUs; on the CPU launch with torchrun (DDP) instead")
        if launch.zero_stage is None:
            p.append("DeepSpeed: the ZeRO stage could not be read (zero_optimization.stage in the DeepSpeed config, "
                     "or zero_stage in the accelerate config); set it to 0, 1 or 2")
        elif launch.zero_stage == 3:
            why = (" (and bitsandbytes' packed 4-/8-bit weights cannot be partitioned by ZeRO-3 at all)"
                   if bits != 16 else "")
            p.append(f"DeepSpeed ZeRO-3 partitions every weight across the GPUs{why}; {sharded}")
    if launch.engine == "fsdp":
        p.append(f"FSDP shards every weight across the GPUs; {sharded}")
    if launch.world_size > 1 and cuda and launch.local_rank >= torch.cuda.device_count():
        p.append(f"LOCAL_RANK {launch.local_rank} but only {torch.cuda.device_count()} GPUs are visible: each process "
                 "needs a GPU of its own")
    return p


def device_map(launch: Launch, cuda: bool | None = None) -> dict[str, Any]:
    """Where ``from_pretrained`` puts the model: the GPU of this process's local rank (not GPU 0 for every process,
    which is where ``torch.cuda.current_device()`` points before the process group starts), or the CPU."""
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    return {"": launch.local_rank} if cuda else {"": "cpu"}
