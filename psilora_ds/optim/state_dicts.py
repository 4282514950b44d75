"""The checkpoint surface of a PSI-LoRA optimizer: its state dicts, per layer name, in any sharded layout."""

from __future__ import annotations

from typing import Any

import torch


class LoRAStateDicts:
    """Mixin of :class:`~psilora_ds.optim.base.LoRAOptimizer` (whose attributes it reads: ``layers``, ``state``,
    ``lora_group``, ``distributor``, ``other_optimizer``, the step counters and the method's
    :meth:`init_state` / :meth:`extra_state` / :meth:`load_extra_state` hooks): what a checkpoint of it holds."""

    def state_dict(self) -> dict[str, Any]:
        """This rank's optimizer state: the LoRA layers' state (by layer name; under layer sharding only
        the owned layers carry tensors), the hyperparameters, and the other optimizer's state."""
        return {**self.lora_state_dict(), "other": self.other_optimizer.state_dict() if self.other_optimizer else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if (state_dict["other"] is None) != (self.other_optimizer is None):
            raise ValueError("optimizer checkpoint and model disagree on having non-LoRA trainable parameters")
        self.load_lora_state_dict(state_dict)
        if self.other_optimizer is not None:
            self.other_optimizer.load_state_dict(state_dict["other"])
            self.resync_param_groups()  # load_state_dict replaced the other optimizer's group dicts

    def lora_state_dict(self) -> dict[str, Any]:
        """:meth:`state_dict` without the other optimizer (engines that checkpoint it themselves)."""
        group = {k: v for k, v in self.lora_group.items() if k != "params"}
        state = {layer.name: dict(self.state[layer.A]) for layer in self.layers if self.state.get(layer.A)}
        return {"layers": state, "lora_group": group, "skipped_steps": self.skipped_steps,
                "steps_taken": self.steps_taken, **self.extra_state(), "layout": self.distributor.layout()}

    def lora_state_template(self) -> dict[str, Any]:
        """A :meth:`lora_state_dict` with an entry for every layer: freshly initialized tensors and
        scalars for the layers this rank owns, the scalars alone for the others (their owner reads the
        tensors): the buffers a sharded checkpoint reader (torch.distributed.checkpoint) loads into.
        A reader drops the keys its checkpoint lacks."""
        sd = self.lora_state_dict()
        for layer in self.layers:
            fresh = self.init_state(layer, self.lora_group)
            if not self.distributor.owns(layer):
                fresh = {k: v for k, v in fresh.items() if not isinstance(v, torch.Tensor)}
            sd["layers"][layer.name] = {**sd["layers"].get(layer.name, {}), **fresh, "initialized": True}
        return sd

    def load_lora_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_loadable(state_dict)
        self.state.clear()
        for layer in self.layers:
            saved = state_dict["layers"].get(layer.name)
            if saved is not None:
                device = layer.A.device
                self.state[layer.A] = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in saved.items()}
                self.distributor.adopt_state(layer, self.state[layer.A])
        self.lora_group.update(state_dict["lora_group"])
        self.skipped_steps = state_dict["skipped_steps"]
        self.steps_taken = state_dict.get("steps_taken", 0)
        self.load_extra_state(state_dict)
        self.discard_step()
        self.refresh_factors()

    def _check_loadable(self, state_dict: dict[str, Any]) -> None:
        """One-line errors for a state dict of another model, or of a layer-sharded run of another world size."""
        names = {layer.name for layer in self.layers}
        unknown = set(state_dict["layers"]) - names
        if unknown:
            raise ValueError(
                f"optimizer checkpoint has state for {len(unknown)} LoRA layers this model lacks "
                f"(e.g. {sorted(unknown)[0]}): load it into the same peft model it was saved from"
            )
        saved_world = state_dict.get("layout", {}).get("world_size", 1)
        for layer in self.layers:
            saved = state_dict["layers"].get(layer.name)
            wants_tensors = any(isinstance(v, torch.Tensor) for v in self.init_state(layer, self.lora_group).values())
            if self.distributor.owns(layer) and saved and wants_tensors and \
                    not any(isinstance(v, torch.Tensor) for v in saved.values()):
                raise ValueError(
                    f"this rank owns {layer.name} but the optimizer checkpoint it reads holds that layer's "
                    f"state on another rank of {saved_world}: load layer-sharded checkpoints with {saved_world} "
                    "ranks, or save/load through torch.distributed.checkpoint (psilora_ds.distributed.fsdp)"
                )

    def state_nbytes(self) -> int:
        """Bytes of the LoRA layers' optimizer state this rank holds (its owned layers when sharded; the copies of the
        other layers' momentum factors are not state: ``factors.momentum_nbytes``, logged at the first step)."""
        return sum(v.numel() * v.element_size() for st in self.state.values() for v in st.values()
                   if isinstance(v, torch.Tensor))
