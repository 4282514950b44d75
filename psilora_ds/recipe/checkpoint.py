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
- ``trainer_state.json``: step, world size, optimizer, engine, the run (its id, the model and adapter it trains,
  its configuration) and the SHA-256 of every other file; written last
  (:mod:`psilora_ds.recipe.checkpoint_files`: every file is verified before it is read, and read as data:
  ``torch.load(weights_only=True)``, never code).
Everything is written into ``.step-N.partial`` and published by one ``rename`` once complete; rotation
renames a checkpoint away before deleting it. So a ``kill -9`` at any point leaves only complete
``step-N`` directories (hidden leftovers are removed at the next start).

Resuming with another number of ranks loads the same state (factors, optimizer state, scheduler);
the dropout RNG streams and the order of the data across ranks then differ from the uninterrupted run
(both depend on the world size). State that exists only as ZeRO partitions cannot move to another
world size: that case is a one-line error naming both sizes.

``resume_from_checkpoint=latest`` takes the newest checkpoint that verifies, saying which newer ones it skipped
and why; a checkpoint named explicitly that does not verify is a one-line error. Non-finite values are never
written: a save that would write one is refused.

``python -m psilora_ds.recipe.checkpoint upgrade CKPT`` converts a checkpoint of the previous format (no
checksums) after reading its files as plain tensors.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from ..distributed.fsdp import load_checkpoint, save_checkpoint
from ..optim.base import LoRAOptimizer
from ..optim.finite_guard import any_non_finite, any_rank
from ..optim.positional_state import PositionalState, PositionalStateError
from .checkpoint_files import (TRAINER_STATE, tensors_in, to_cpu, CheckpointError, directory_digests, load_tensors, publish_directory,
                               read_manifest, save_tensors, verify_files, write_manifest)
from .config import ConfigError
from .faults import fault_point, fault_requested
from .engines import TrainableParams

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
DCP_ENGINE = "fsdp2"  # the engine whose checkpoints go through torch.distributed.checkpoint
STATE_FILE = "state.pt"


@dataclass
class TrainerState:
    step: int
    world_size: int
    optim: str
    engine: str  # "pytorch", "fsdp2" or "deepspeed-zero<stage>"
    engine_skipped_steps: int = 0
    rank_specific: list[str] = field(default_factory=list)  # optimizer state held per rank (ZeRO partitions)
    run_id: str = ""  # made when a run starts fresh, kept by its resumes
    identity: dict[str, Any] | None = None  # the model and adapter trained (recipe.resume.run_identity)
    config: dict[str, Any] = field(default_factory=dict)  # the run's configuration when it saved
    files: dict[str, str] = field(default_factory=dict)  # relative path -> SHA-256


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _has_tensors(layer_state: dict[str, Any]) -> bool:
    return any(isinstance(v, torch.Tensor) for v in layer_state.values())


def gathered_lora_state(optimizer: LoRAOptimizer) -> dict[str, Any] | None:
    """The LoRA optimizer state of every layer, each from the rank that owns it, on rank 0 (None on
    the others); a collective when several ranks run."""
    sd = to_cpu(optimizer.lora_state_dict())
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


def _positional(optimizer: torch.optim.Optimizer) -> PositionalState:
    """``optimizer``, when it can save its state by position (what ZeRO's partitions need), else one line."""
    if not isinstance(optimizer, PositionalState):
        raise ConfigError(f"{type(optimizer).__name__} cannot be checkpointed under ZeRO >= 1 by the recipe (its "
                          "state is keyed by the engine's partitions): build it with "
                          "psilora_ds.optim.skipping_non_finite")
    return optimizer


def positional_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A ZeRO-partitioned torch optimizer's state (:class:`psilora_ds.optim.positional_state.PositionalState`)."""
    return _positional(optimizer).positional_state_dict()


def load_positional_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any], where: str) -> None:
    try:
        _positional(optimizer).load_positional_state_dict(saved)
    except PositionalStateError as err:
        raise CheckpointError(f"{where}: {err}") from None


def optimizer_state(optimizer: torch.optim.Optimizer, partitioned: bool) -> tuple[dict | None, dict]:
    """``(portable, this rank's)``: the state that is the same on any number of ranks (rank 0's copy;
    None elsewhere), and what exists only as this rank's ZeRO partition (``partitioned``: ZeRO >= 1,
    where the engine hands optimizers flat partitions: kept by position, :func:`positional_state`)."""
    if isinstance(optimizer, LoRAOptimizer):
        lora = gathered_lora_state(optimizer)
        other = optimizer.other_optimizer
        own = {"other": positional_state(other)} if partitioned and other is not None else {}
        portable_other = None if own or other is None else to_cpu(other.state_dict())
        return (None if lora is None else {**lora, "other": portable_other}), own
    if partitioned:
        return {}, {"torch": positional_state(optimizer)}
    return {"torch": to_cpu(optimizer.state_dict())}, {}


def _check_finite(step: int, *values: Any) -> None:
    """Refuse to write non-finite weights or optimizer state (every rank: this rank's tensors, DTensors by their
    shard, agreed over the ranks)."""
    if any_rank(any_non_finite(tensors_in(values))):
        raise CheckpointError(f"step {step}: trainable or optimizer-state values are not finite; the checkpoint is not "
                              "written (the older ones are kept): resume from the newest one with a lower --lr or "
                              "stronger --max_grad_norm")


def _write(step: int, write, *args) -> Any:
    """Run one file write of a save; a full disk (or an injected one) is one error line keeping older checkpoints."""
    try:
        if fault_requested("enospc", step):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(*args)
    except OSError as err:
        raise CheckpointError(f"checkpoint step-{step} could not be written ({err.strerror}); the older checkpoints "
                              "are kept: free space (or choose another output_dir) and resume with "
                              "--resume_from_checkpoint latest") from None


def save(root: str, trainer: TrainerState, *, params: TrainableParams, optimizer: torch.optim.Optimizer,
         scheduler, partitioned: bool, keep: int, sharded_model: torch.nn.Module | None = None) -> str:
    """Write ``root/step-N`` (every rank calls it) and keep the newest ``keep`` checkpoints;
    ``sharded_model``: the FSDP2 model, whose state goes through torch.distributed.checkpoint."""
    rank, world = _rank_world()
    step = trainer.step
    final = os.path.join(root, f"step-{step}")
    partial = os.path.join(root, f".step-{step}.partial")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        _write(step, os.makedirs, partial)
    _barrier()
    try:
        files = _save_files(partial, trainer, params=params, optimizer=optimizer, scheduler=scheduler,
                            partitioned=partitioned, sharded_model=sharded_model)
        if rank == 0:
            trainer.files = files
            _write(step, write_manifest, partial, asdict(trainer))
    except CheckpointError:
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    if rank == 0:
        _publish(partial, final)
        rotate(root, keep)
    _barrier()
    return final


def _save_files(partial: str, trainer: TrainerState, *, params, optimizer, scheduler, partitioned: bool,
                sharded_model) -> dict[str, str]:
    """Every file but the manifest; returns ``{relative path: SHA-256}`` on rank 0."""
    rank, world = _rank_world()
    step = trainer.step
    if sharded_model is not None:
        _check_finite(step, [p for p in sharded_model.parameters() if p.requires_grad])
        save_checkpoint(os.path.join(partial, "dcp"), sharded_model, optimizer,
                        extra={"scheduler": scheduler.state_dict()})
        portable, own = None, {}
    else:
        trainable = params.state()  # collectives under ZeRO >= 1
        portable, own = optimizer_state(optimizer, partitioned)
        _check_finite(step, trainable if rank == 0 else None, portable, own)
    rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    rank_file = f"rank-{rank}.pt"
    digest = _write(step, save_tensors, {"rng": rng, "optimizer": own}, os.path.join(partial, rank_file))
    digests = [None] * world
    if dist.is_initialized():
        dist.all_gather_object(digests, (rank_file, digest))
    else:
        digests = [(rank_file, digest)]
    fault_point("checkpoint", step)
    files = dict(digests)
    if rank == 0 and sharded_model is None:
        trainer.rank_specific = sorted(own)
        files[STATE_FILE] = _write(step, save_tensors, {"trainable": trainable, "optimizer": portable,
                                                        "scheduler": scheduler.state_dict()},
                                   os.path.join(partial, STATE_FILE))
    _barrier()  # every rank's file is on disk
    if rank == 0 and sharded_model is not None:
        files.update(directory_digests(partial, "dcp"))
    return files


def _publish(partial: str, final: str) -> None:
    # (a run writing over one of its own older steps: the old one is moved to a hidden leftover first)
    root = os.path.dirname(final)
    publish_directory(partial, final, os.path.join(root, "." + os.path.basename(final.rstrip("/")) + ".replaced"))
    remove_leftovers(root)


def checkpoint_dirs(root: str) -> list[tuple[int, str]]:
    """Published checkpoints under ``root`` (holding a manifest), oldest first; not yet verified."""
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
    """Delete all but the newest ``keep`` checkpoints; each is renamed away (atomically) before its files go.
    Only checkpoints that verify count towards ``keep``: a damaged newer one never pushes out a good older one."""
    if keep <= 0:
        return
    good = [(step, path) for step, path in checkpoint_dirs(root) if verify(path) is None]
    for step, path in good[:-keep]:
        doomed = os.path.join(root, f".step-{step}.deleting")
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def read_trainer_state(path: str) -> TrainerState:
    """The verified trainer state of checkpoint ``path`` (its files are not checked here: :func:`verify`)."""
    body = read_manifest(path)
    body.pop("format", None)
    known = TrainerState.__dataclass_fields__
    try:
        return TrainerState(**{k: v for k, v in body.items() if k in known})
    except TypeError as err:
        raise CheckpointError(f"{os.path.join(path, TRAINER_STATE)} lacks what a checkpoint records ({err})") from None


def verify(path: str) -> str | None:
    """Why checkpoint ``path`` cannot be resumed (damaged, incomplete, old format, a ``.pt`` file holding more than
    tensors), or None when it verifies."""
    try:
        files = read_trainer_state(path).files
        verify_files(path, files)
        for name, digest in files.items():  # what resuming reads as tensors must load as data
            if name.endswith(".pt"):
                load_tensors(os.path.join(path, name), digest)
    except CheckpointError as err:
        return str(err)
    return None


def resolve_resume(spec: str | None, root: str) -> str | None:
    """``None``, a checkpoint directory, or ``"latest"``: the newest checkpoint under ``root`` that verifies (each
    newer one skipped with a warning saying why). Every rank gets rank 0's answer."""
    if spec is None:
        return None
    rank, _ = _rank_world()
    answer: list[Any] = [None]
    if rank == 0:
        try:
            answer = [_resolve(spec, root)]
        except ConfigError as err:
            answer = [err]
    if dist.is_initialized():
        dist.broadcast_object_list(answer, src=0)
    if isinstance(answer[0], ConfigError):
        raise answer[0]
    return answer[0]


def _resolve(spec: str, root: str) -> str:
    if spec == "latest":
        for step, path in reversed(checkpoint_dirs(root)):
            problem = verify(path)
            if problem is None:
                return path
            logger.warning("skipping checkpoint %s: %s", path, problem)
        raise ConfigError(f"resume_from_checkpoint=latest but {root} holds no complete checkpoint that verifies; "
                          "drop the key to start a new run")
    if not os.path.isdir(spec):
        raise ConfigError(f"resume_from_checkpoint={spec} does not exist (give a checkpoints/step-N directory "
                          "or \"latest\")")
    if not os.path.exists(os.path.join(spec, TRAINER_STATE)):
        raise ConfigError(f"resume_from_checkpoint={spec} is not a complete checkpoint (no {TRAINER_STATE}): "
                          "give a checkpoints/step-N directory or \"latest\"")
    problem = verify(spec)
    if problem is not None:
        raise CheckpointError(f"resume_from_checkpoint={spec}: {problem}")
    return spec


def load(path: str, *, optim: str, params: TrainableParams, optimizer: torch.optim.Optimizer, scheduler,
         device: torch.device, sharded_model: torch.nn.Module | None = None) -> TrainerState:
    """Restore a checkpoint written by :func:`save` (every rank calls it): trainable parameters, optimizer state,
    LR scheduler, RNG; returns its trainer state. ``sharded_model``: this run's FSDP2 model (it reads FSDP2
    checkpoints, and only those)."""
    rank, world = _rank_world()
    trainer = read_trainer_state(path)
    if trainer.optim != optim:
        raise ConfigError(f"{path} was written by optim={trainer.optim}; resume it with --optim {trainer.optim}")
    if (trainer.engine == DCP_ENGINE) != (sharded_model is not None):
        how = "with --fsdp true (on any number of ranks)" if trainer.engine == DCP_ENGINE else "without --fsdp"
        raise ConfigError(f"{path} was written by the {trainer.engine} engine; resume it {how}")
    same_world = trainer.world_size == world
    rank_file = f"rank-{rank}.pt"
    if sharded_model is not None:
        verify_files(path, {k: v for k, v in trainer.files.items() if k.startswith("dcp" + os.sep)})
        try:
            saved = load_checkpoint(os.path.join(path, "dcp"), sharded_model, optimizer,
                                    extra={"scheduler": scheduler.state_dict()})
        except (Exception, CheckpointException) as err:  # the safe reader's refusal (DCP wraps it in its exception,
            # a BaseException), or a file that does not parse
            lines = str(err).splitlines() or [type(err).__name__]
            detail = next((line.strip() for line in lines if "is not allowed" in line), lines[0])
            raise CheckpointError(f"{path}/dcp cannot be loaded as data: {detail}") from None
        scheduler.load_state_dict(saved["scheduler"])
        own = load_tensors(os.path.join(path, rank_file), trainer.files[rank_file]) if same_world else None
        _restore_rng(path, trainer, device, own)
        return trainer
    if not same_world and trainer.rank_specific:
        raise ConfigError(f"{path} was saved by {trainer.world_size} ranks and holds ZeRO-partitioned optimizer "
                          f"state ({', '.join(trainer.rank_specific)}: non-LoRA trainables or a torch optimizer at "
                          f"ZeRO >= 1), which cannot move to {world} ranks: resume it with {trainer.world_size}")
    state = load_tensors(os.path.join(path, STATE_FILE), trainer.files[STATE_FILE])
    own = load_tensors(os.path.join(path, rank_file), trainer.files[rank_file]) if same_world else {"optimizer": {}}
    try:
        params.load(state["trainable"])
        portable, partition = state["optimizer"], own["optimizer"]
        if isinstance(optimizer, LoRAOptimizer):
            if "other" in partition:
                optimizer.load_lora_state_dict(portable)
                load_positional_state(optimizer.other_optimizer, partition["other"], path)
                optimizer.resync_param_groups()
            else:
                optimizer.load_state_dict(portable)
        elif "torch" in partition:
            load_positional_state(optimizer, partition["torch"], path)
        else:
            optimizer.load_state_dict(portable["torch"])
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{path} does not hold what this run's optimizer and model need ({type(err).__name__}: "
                              f"{err}): resume with the settings it was saved with") from None
    scheduler.load_state_dict(state["scheduler"])
    _restore_rng(path, trainer, device, own)
    return trainer


def _restore_rng(path: str, trainer: TrainerState, device: torch.device, own: dict[str, Any] | None) -> None:
    """This rank's RNG streams when the world size is the one that saved (else a warning)."""
    _, world = _rank_world()
    if trainer.world_size == world and own is not None:
        torch.set_rng_state(own["rng"]["cpu"])
        if "cuda" in own["rng"] and device.type == "cuda":
            torch.cuda.set_rng_state(own["rng"]["cuda"])
    else:
        logger.warning("%s was saved by %d ranks, resuming on %d: factors, optimizer state and schedule continue; "
                       "the data order across ranks and the dropout RNG streams differ from the uninterrupted run",
                       path, trainer.world_size, world)


def upgrade(path: str) -> None:
    """Convert a checkpoint of format 1 (no manifest) in place: its ``.pt`` files are read as plain tensors
    (``weights_only=True``: a file holding anything else is refused, nothing runs), and a manifest with their
    digests is written. The model identity and configuration were not recorded then: a resume cannot check them."""
    from .checkpoint_files import FORMAT, sha256_of

    where = os.path.join(path, TRAINER_STATE)
    with open(where) as f:
        body = json.load(f)
    if body.get("format") == FORMAT:
        raise CheckpointError(f"{path} is already of format {FORMAT}")
    if body.get("engine") == DCP_ENGINE:
        raise CheckpointError(f"{path} is an FSDP2 checkpoint of format 1, whose metadata only pickle reads: it "
                              "cannot be converted safely; resume it with the psilora_ds version that wrote it")
    files = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".pt"):
            full = os.path.join(path, name)
            digest = sha256_of(full)
            load_tensors(full, digest)  # refuses anything but tensors in plain containers
            files[name] = digest
    trainer = TrainerState(**{k: v for k, v in body.items() if k in TrainerState.__dataclass_fields__})
    trainer.files = files
    write_manifest(path, asdict(trainer))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "upgrade":
        print("usage: python -m psilora_ds.recipe.checkpoint upgrade CHECKPOINT_DIR", file=sys.stderr)
        return 2
    try:
        upgrade(argv[1])
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{argv[1]}: converted to the current checkpoint format")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
