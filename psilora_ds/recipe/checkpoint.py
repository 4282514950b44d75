"""The recipe's checkpoints: what a LoRA run needs to continue, never the frozen base, in files that do
not depend on the engine or the number of ranks, and never a directory that looks complete but is not.

``checkpoints/step-N/`` holds
- ``state.pt`` (written by rank 0): every trainable parameter's full fp32 master by name, the
  optimizer state (PSI-LoRA: every LoRA layer's state by layer name, gathered from the ranks that own
  it), the LR scheduler;
- or, under FSDP2, ``dcp/`` instead: the same through ``torch.distributed.checkpoint``, each rank
  writing its own shards and the state of the LoRA layers it owns
  (:func:`psilora_ds.distributed.fsdp.save_checkpoint`); it loads on any number of FSDP2 ranks;
- ``rank-K.pt`` (one per rank): that rank's RNG state, and the optimizer state that only exists as
  ZeRO partitions (the non-LoRA optimizer, or a torch baseline, at ZeRO >= 1);
- ``trainer_state.json``: step, world size, optimizer, engine; written last.
Everything is written into ``.step-N.partial`` and published by one ``rename`` once complete; rotation
renames a checkpoint away before deleting it. So a ``kill -9`` at any point leaves only complete
``step-N`` directories (hidden leftovers are removed at the next start).

Resuming with another number of ranks loads the same state (factors, optimizer state, scheduler);
the dropout RNG streams and the order of the data across ranks then differ from the uninterrupted run
(both depend on the world size). State that exists only as ZeRO partitions cannot move to another
world size: that case is a one-line error naming both sizes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..distributed.fsdp import load_checkpoint, save_checkpoint
from ..optim.base import LoRAOptimizer
from .config import ConfigError
from .engines import TrainableParams

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
DCP_ENGINE = "fsdp2"  # the engine whose checkpoints go through torch.distributed.checkpoint
TRAINER_STATE = "trainer_state.json"
FAULT_ENV = "PSILORA_DS_FAULT"  # tests: "step:N" or "checkpoint:N" SIGKILLs every rank there


@dataclass
class TrainerState:
    step: int
    world_size: int
    optim: str
    engine: str  # "pytorch", "fsdp2" or "deepspeed-zero<stage>"
    engine_skipped_steps: int = 0
    rank_specific: list[str] = field(default_factory=list)  # optimizer state held per rank (ZeRO partitions)


def fault_point(where: str, step: int) -> None:
    """Die like ``kill -9`` here when the tests ask for it through ``PSILORA_DS_FAULT``."""
    if os.environ.get(FAULT_ENV) == f"{where}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _save_synced(obj: Any, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def _has_tensors(layer_state: dict[str, Any]) -> bool:
    return any(isinstance(v, torch.Tensor) for v in layer_state.values())


def gathered_lora_state(optimizer: LoRAOptimizer) -> dict[str, Any] | None:
    """The LoRA optimizer state of every layer, each from the rank that owns it, on rank 0 (None on
    the others); a collective when several ranks run."""
    sd = _to_cpu(optimizer.lora_state_dict())
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return sd
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(sd["layers"], parts, dst=0)
    if dist.get_rank() != 0:
        return None
    layers: dict[str, Any] = {}
    for part in parts:
        for name, st in part.items():
            if _has_tensors(st) or name not in layers:
                layers[name] = st
    return {**sd, "layers": layers}


def optimizer_state(optimizer: torch.optim.Optimizer, partitioned: bool) -> tuple[dict | None, dict]:
    """``(portable, this rank's)``: the state that is the same on any number of ranks (rank 0's copy;
    None elsewhere), and what exists only as this rank's ZeRO partition (``partitioned``: ZeRO >= 1,
    where the engine hands optimizers flat partitions)."""
    if isinstance(optimizer, LoRAOptimizer):
        lora = gathered_lora_state(optimizer)
        other = optimizer.other_optimizer.state_dict() if optimizer.other_optimizer is not None else None
        own = {"other": other} if partitioned and other is not None else {}
        return (None if lora is None else {**lora, "other": None if own else other}), own
    if partitioned:
        return {}, {"torch": optimizer.state_dict()}
    return {"torch": optimizer.state_dict()}, {}


def save(root: str, trainer: TrainerState, *, params: TrainableParams, optimizer: torch.optim.Optimizer,
         scheduler, partitioned: bool, keep: int, sharded_model: torch.nn.Module | None = None) -> str:
    """Write ``root/step-N`` (every rank calls it) and keep the newest ``keep`` checkpoints;
    ``sharded_model``: the FSDP2 model, whose state goes through torch.distributed.checkpoint."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    final = os.path.join(root, f"step-{trainer.step}")
    partial = os.path.join(root, f".step-{trainer.step}.partial")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    _barrier()
    if sharded_model is not None:
        save_checkpoint(os.path.join(partial, "dcp"), sharded_model, optimizer,
                        extra={"scheduler": scheduler.state_dict()})
        portable, own = None, {}
    else:
        trainable = params.state()  # collectives under ZeRO >= 1
        portable, own = optimizer_state(optimizer, partitioned)
    rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    _save_synced({"rng": rng, "optimizer": own}, os.path.join(partial, f"rank-{rank}.pt"))
    fault_point("checkpoint", trainer.step)
    if rank == 0 and sharded_model is None:
        trainer.rank_specific = sorted(own)
        _save_synced({"trainable": trainable, "optimizer": portable, "scheduler": scheduler.state_dict()},
                     os.path.join(partial, "state.pt"))
    _barrier()  # every rank's file is on disk
    if rank == 0:
        with open(os.path.join(partial, TRAINER_STATE), "w") as f:
            json.dump(asdict(trainer), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _publish(partial, final)
        rotate(root, keep)
    _barrier()
    return final


def _publish(partial: str, final: str) -> None:
    if os.path.exists(final):  # a fresh run writing over an older run's step: move the old one away first
        old = final.rstrip("/") + ".replaced"
        os.rename(final, os.path.join(os.path.dirname(final), "." + os.path.basename(old)))
    os.rename(partial, final)
    fd = os.open(os.path.dirname(final), os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself is durable
    finally:
        os.close(fd)
    remove_leftovers(os.path.dirname(final))


def checkpoint_dirs(root: str) -> list[tuple[int, str]]:
    """Complete checkpoints under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name)) for name in os.listdir(root)
             if (m := CHECKPOINT_RE.match(name)) and os.path.exists(os.path.join(root, name, TRAINER_STATE))]
    return sorted(found)


def remove_leftovers(root: str) -> None:
    """Delete what an interrupted save or rotation left (hidden ``.step-*`` directories)."""
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(".step-"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def rotate(root: str, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints; each is renamed away (atomically) before its files go."""
    for step, path in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
        doomed = os.path.join(root, f".step-{step}.deleting")
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def resolve_resume(spec: str | None, root: str) -> str | None:
    """``None``, a checkpoint directory, or ``"latest"`` (the newest complete one under ``root``)."""
    if spec is None:
        return None
    if spec == "latest":
        found = checkpoint_dirs(root)
        if not found:
            raise ConfigError(f"resume_from_checkpoint=latest but {root} holds no complete checkpoint; "
                              "drop the key to start a new run")
        return found[-1][1]
    if not os.path.isdir(spec):
        raise ConfigError(f"resume_from_checkpoint={spec} does not exist (give a checkpoints/step-N directory "
                          "or \"latest\")")
    if not os.path.exists(os.path.join(spec, TRAINER_STATE)):
        raise ConfigError(f"resume_from_checkpoint={spec} is not a complete checkpoint (no {TRAINER_STATE}): "
                          "give a checkpoints/step-N directory or \"latest\"")
    return spec


def read_trainer_state(path: str) -> TrainerState:
    with open(os.path.join(path, TRAINER_STATE)) as f:
        return TrainerState(**json.load(f))


def load(path: str, *, optim: str, params: TrainableParams, optimizer: torch.optim.Optimizer, scheduler,
         device: torch.device, sharded_model: torch.nn.Module | None = None) -> TrainerState:
    """Restore a checkpoint written by :func:`save` (every rank calls it); returns its trainer state.
    ``sharded_model``: this run's FSDP2 model (it reads FSDP2 checkpoints, and only those)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    trainer = read_trainer_state(path)
    if trainer.optim != optim:
        raise ConfigError(f"{path} was written by optim={trainer.optim}; resume it with --optim {trainer.optim}")
    if (trainer.engine == DCP_ENGINE) != (sharded_model is not None):
        how = "with --fsdp true (on any number of ranks)" if trainer.engine == DCP_ENGINE else "without --fsdp"
        raise ConfigError(f"{path} was written by the {trainer.engine} engine; resume it {how}")
    same_world = trainer.world_size == world
    if sharded_model is not None:
        saved = load_checkpoint(os.path.join(path, "dcp"), sharded_model, optimizer,
                                extra={"scheduler": scheduler.state_dict()})
        scheduler.load_state_dict(saved["scheduler"])
        _restore_rng(path, trainer, device)
        return trainer
    if not same_world and trainer.rank_specific:
        raise ConfigError(f"{path} was saved by {trainer.world_size} ranks and holds ZeRO-partitioned optimizer "
                          f"state ({', '.join(trainer.rank_specific)}: non-LoRA trainables or a torch optimizer at "
                          f"ZeRO >= 1), which cannot move to {world} ranks: resume it with {trainer.world_size}")
    state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)
    own = torch.load(os.path.join(path, f"rank-{rank}.pt"), map_location="cpu", weights_only=False) \
        if same_world else {"optimizer": {}}
    params.load(state["trainable"])
    portable, partition = state["optimizer"], own["optimizer"]
    if isinstance(optimizer, LoRAOptimizer):
        other = partition.get("other", portable.get("other"))
        optimizer.load_state_dict({**portable, "other": other})
    else:
        optimizer.load_state_dict(partition.get("torch", portable.get("torch")))
    scheduler.load_state_dict(state["scheduler"])
    _restore_rng(path, trainer, device, own)
    return trainer


def _restore_rng(path: str, trainer: TrainerState, device: torch.device, own: dict[str, Any] | None = None) -> None:
    """This rank's RNG streams when the world size is the one that saved (else a warning); ``own``: this
    rank's file when the caller already read it."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if trainer.world_size == world:
        if own is None:
            own = torch.load(os.path.join(path, f"rank-{rank}.pt"), map_location="cpu", weights_only=False)
        torch.set_rng_state(own["rng"]["cpu"])
        if "cuda" in own["rng"] and device.type == "cuda":
            torch.cuda.set_rng_state(own["rng"]["cuda"])
    else:
        logger.warning("%s was saved by %d ranks, resuming on %d: factors, optimizer state and schedule continue; "
                       "the data order across ranks and the dropout RNG streams differ from the uninterrupted run",
                       path, trainer.world_size, world)
