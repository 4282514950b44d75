"""torch FSDP2 (``torch.distributed.fsdp.fully_shard``): factors are DTensors sharded on dim 0.

The full fp32 factors of a layer are all-gathered with ``DTensor.full_tensor()`` when it is updated
(METHOD.md section 6: "gather the factors of one layer at a time") and written back shard by shard
with ``distribute_tensor``; LoRSum never runs on a shard. FSDP2 averages gradients over the mesh,
non-LoRA gradients are sharded (their squared norms add up over ranks), and each rank keeps the
optimizer state of the layers it owns.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from ..lora_layers import LoRALayer
from .base import LoRAOptimizerProtocol
from .ddp import DDPDistributor

logger = logging.getLogger(__name__)


class FSDP2Distributor(DDPDistributor):
    """Adapter for models wrapped with ``fully_shard`` over a 1-D data-parallel mesh."""

    reads_dtensors = True

    def __init__(self, group=None, *, shard_state: bool = True):
        super().__init__(group, shard_state=shard_state)
        # whether every rank's factor shards are cut as distribute_tensor cuts them, so that a rank can compare
        # the optimizer's copy with its shard alone (agreed by all ranks in bind: a rank that alone fell back to a
        # collective read would leave the others waiting)
        self.shards_cut_locally = True

    def bind(self, layers: Sequence[LoRALayer], *, norm_probes: int = 0,
             factors: Sequence[Sequence[torch.Tensor]] | None = None) -> None:
        super().bind(layers, norm_probes=norm_probes, factors=factors)
        sharded = [p for f in self.layer_factors for p in f if isinstance(p, DTensor)]
        if not sharded:  # (the same model on every rank: all skip)
            return
        odd = torch.tensor([0.0 if all(_cut_like_distribute_tensor(p) for p in sharded) else 1.0],
                           device=sharded[0].to_local().device)
        self.all_reduce_(odd)
        self.shards_cut_locally = float(odd) == 0.0
        if not self.shards_cut_locally:
            logger.warning("FSDP2 shards of the LoRA factors are not cut as distribute_tensor cuts them on some rank: "
                           "every step reads each layer's factors whole (an all-gather per factor)")

    def read_factors(self, layer: LoRALayer, masters: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        params = super().read_factors(layer, masters)
        self._count_factor_reads([p for p in params if isinstance(p, DTensor)])  # (an all-gather each)
        return tuple(p.full_tensor() if isinstance(p, DTensor) else p for p in params)

    def write_factors(self, layer: LoRALayer, masters: Sequence[torch.Tensor], *factors: torch.Tensor) -> None:
        for param, new in zip(super().read_factors(layer, masters), factors, strict=True):
            if isinstance(param, DTensor):
                param.to_local().copy_(_local_shard(new.to(param.dtype), param))
            else:
                param.copy_(new)

    def reads_factors_collectively(self, masters: Sequence[torch.Tensor]) -> bool:
        return self.shards_cut_locally and any(isinstance(p, DTensor) for p in masters)

    def factors_changed(self, layers: Sequence[LoRALayer], masters: Sequence[torch.Tensor],
                        factors: Sequence[tuple[torch.Tensor, ...]]) -> torch.Tensor:
        flags = []
        for layer, given in zip(layers, factors):
            params = super().read_factors(layer, masters)
            if not self.shards_cut_locally or not all(isinstance(p, DTensor) for p in params):
                flags.append(super().factors_changed([layer], masters, [given])[0])  # read whole: every rank alike
                continue
            # this rank's shards against the same cut of the copy: no collective, compared on the device
            differs = [torch.ne(param.to_local(), _local_shard(full.to(param.dtype), param)).any()
                       for param, full in zip(params, given, strict=True)]
            flags.append(torch.stack(differs).any().to(device=given[0].device, dtype=torch.float64))
        if not flags:
            return torch.zeros(0, dtype=torch.float64)
        return torch.stack(flags)

    def lora_grads_are_whole(self) -> bool:
        return False  # reduce-scattered DTensor shards (the products stay in the hooks)

    def factor_grads_are_whole_locally(self) -> bool:
        return False  # the factors are DTensor shards: their gradients arrive reduce-scattered

    def other_grads_are_sharded(self) -> bool:
        return True


def _cut_like_distribute_tensor(param: DTensor) -> bool:
    """Whether this rank's shard of ``param`` has the shape ``distribute_tensor`` gives it (no communication)."""
    return param.to_local().shape == _local_shard(torch.empty(param.shape, dtype=param.dtype,
                                                              device=param.to_local().device), param).shape


def _local_shard(full: torch.Tensor, like: DTensor) -> torch.Tensor:
    """This rank's shard of ``full`` laid out as ``like`` (every rank holds ``full``: no communication)."""
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                   trainable_only: bool = True) -> dict[str, Any]:
    """What a run needs to continue, as a ``torch.distributed.checkpoint`` state dict (each rank its
    shards): ``model`` (the trainable parameters only, unless ``trainable_only=False``), and for a
    PSI-LoRA optimizer ``psilora`` (each rank the layers it owns) and ``other`` (the non-LoRA
    optimizer), for any other optimizer ``optim``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    state: dict[str, Any] = {"model": get_model_state_dict(
        model, options=StateDictOptions(ignore_frozen_params=trainable_only))}
    if isinstance(optimizer, LoRAOptimizerProtocol):
        state["psilora"] = optimizer.lora_state_dict()
        if optimizer.other_optimizer is not None:
            state["other"] = get_optimizer_state_dict(model, optimizer.other_optimizer)
    else:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    return state


def save_checkpoint(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                    trainable_only: bool = True, extra: dict[str, Any] | None = None) -> None:
    """Save :func:`training_state` (and ``extra``, e.g. a scheduler's state dict) with
    ``torch.distributed.checkpoint`` (every rank calls it); loadable on any number of ranks. The frozen
    base is left out unless ``trainable_only=False``: it is reloaded from where it came from."""
    import torch.distributed.checkpoint as dcp

    state = training_state(model, optimizer, trainable_only=trainable_only)
    if extra is not None:
        state["extra"] = extra
    dcp.save(state, checkpoint_id=path)


def load_checkpoint(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                    trainable_only: bool = True, extra: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Load what :func:`save_checkpoint` wrote (every rank calls it), re-sharding to this run's ranks:
    each rank reads its parameter shards and the PSI-LoRA state of the layers it owns now, whoever saved
    them. ``extra``: the template of what was saved as ``extra`` (e.g. the scheduler's current state
    dict); its loaded values are returned."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = training_state(model, optimizer, trainable_only=trainable_only)
    if isinstance(optimizer, LoRAOptimizerProtocol):
        state["psilora"] = _saved_part(optimizer.lora_state_template(), _saved_keys(path))
    if extra is not None:
        state["extra"] = extra
    dcp.load(state, storage_reader=safe_dcp_reader(path))
    set_model_state_dict(model, state["model"], options=StateDictOptions(ignore_frozen_params=trainable_only,
                                                                         strict=not trainable_only))
    if isinstance(optimizer, LoRAOptimizerProtocol):
        optimizer.load_lora_state_dict(state["psilora"])
        if optimizer.other_optimizer is not None:
            set_optimizer_state_dict(model, optimizer.other_optimizer, state["other"])
            optimizer.resync_param_groups()
    else:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    return state.get("extra")


def _saved_keys(path: str) -> set[str]:
    return set(safe_dcp_reader(path).read_metadata().state_dict_metadata)


def _saved_part(template: dict[str, Any], saved: set[str]) -> dict[str, Any]:
    """The PSI-LoRA template cut to the layers and keys the checkpoint holds. A layer is in it when
    any rank saved anything of it (then its owner saved its tensors); a layer never stepped is not,
    and every rank then starts it fresh alike: the ranks agree on which layers' state exists."""
    layers = {}
    for name, st in template["layers"].items():
        prefix = f"psilora.layers.{name}."
        if any(key.startswith(prefix) for key in saved):
            layers[name] = {k: v for k, v in st.items() if prefix + k in saved}
    return {**template, "layers": layers}


# ---- loading DCP metadata without pickle's globals ----------------------------------------------------------
# torch's FileSystemReader loads a checkpoint's ``.metadata`` with plain ``pickle.load``: a crafted file runs code.
# The reader below builds only DCP's metadata classes, torch sizes and dtypes; DCP itself loads the tensor and
# bytes entries with ``torch.load(weights_only=True)``.

_DCP_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                         "torch.distributed.checkpoint.planner")
_TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format)
# plain values the metadata holds: the checkpoint's path, a layout looked up by name, an ordered dict
_PLAIN_GLOBALS = {("collections", "OrderedDict"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                  ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes, ``torch.Size``, torch dtypes / layouts / memory formats and
    :data:`_PLAIN_GLOBALS`; any other global is an ``UnpicklingError``."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP_METADATA_MODULES and not name.startswith("__"):
            obj = super().find_class(module, name)
            if isinstance(obj, type):  # (dataclasses and enums; not functions)
                return obj
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), _TORCH_VALUES)):
            return getattr(torch, name)
        if (module, name) in _PLAIN_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a checkpoint's metadata")


def load_dcp_metadata(data: bytes) -> Any:
    """DCP ``.metadata`` bytes as their ``Metadata`` object, refusing every other global (``UnpicklingError``)."""
    return _MetadataUnpickler(io.BytesIO(data)).load()


def safe_dcp_reader(path: str):
    """A ``torch.distributed.checkpoint`` storage reader for ``path`` (DCP's public ``FileSystemReader``) whose
    ``read_metadata`` goes through :func:`load_dcp_metadata` instead of ``pickle.load``."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeDCPReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:  # FileSystemReader's, with the safe loader
            rank = kwargs.get("rank")
            with open(os.path.join(path, ".metadata" if rank is None else f"__{rank}.metadata"), "rb") as f:
                metadata = load_dcp_metadata(f.read())
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeDCPReader(path)
