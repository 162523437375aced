"""A set of bypass adapters for one model, turned into one ModelPatcher injection.

It is what ``comfy.weight_adapter.bypass.BypassInjectionManager`` should be: it accepts
all three ``load_lora`` key forms, keeps any number of adapters per module, and builds one
:class:`~freefuse_bypass_patch.hooks.FusedBypassHook` per module. Adapters added here
directly (ComfyUI's trainer, other plugins) are decided by :mod:`.slots` when the hooks are
made, each fate logged once; there is no patcher to merge into, so what only merging could
apply is refused. It imports nothing from the bypass module, so it also runs on ComfyUI
versions that predate bypass mode.
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Dict, Iterable, List, Mapping, Optional

import torch

from .copies import FollowingInjection
from .hooks import FusedBypassHook
from .keys import Offset, parse_target
from .slots import REFUSED, TRANSIENT, AdapterSlot, decided
from .weights import logical_shape

log = logging.getLogger(__name__)


class FusedBypassManager:
    """Adapters keyed by target; ``create_injections`` gives one injection for all of them."""

    def __init__(self, slots: Iterable[AdapterSlot] = (), layout: str = "auto"):
        self.slots: List[AdapterSlot] = list(slots)
        self.layout = layout  # grouped up-projections (hooks.LAYOUTS): the tests and benchmarks choose
        self.hooks: List[FusedBypassHook] = []
        self._following: list = []  # the FollowingInjection of each create_injections (copies.py)

    def add_adapter(self, key: Any, adapter: Any, strength: float = 1.0,
                    offset: Optional[Offset] = None) -> AdapterSlot:
        """Add an adapter under any load_lora key form; raises BypassKeyError on a malformed key."""
        slot = AdapterSlot(key, parse_target(key, offset), adapter, float(strength))
        self.slots.append(slot)
        return slot

    def clear_adapters(self) -> None:
        self.slots.clear()

    def by_module(self) -> Dict[str, List[AdapterSlot]]:
        grouped: Dict[str, List[AdapterSlot]] = {}
        for slot in self.slots:
            grouped.setdefault(slot.target.module_path, []).append(slot)
        return grouped

    def create_hooks(self, model: torch.nn.Module,
                     modules: Optional[Mapping[str, torch.nn.Module]] = None) -> List[FusedBypassHook]:
        """One hook per module; slots whose module is missing, or that are refused, are logged and left out.
        ``modules``: ``model``'s modules by path, when the caller has them (the loader walked the tree)."""
        hooks, transient = [], collections.Counter()
        for path, slots in self.by_module().items():
            try:
                module = modules[path] if modules is not None and path in modules else model.get_submodule(path)
            except AttributeError:
                log.warning("[freefuse_bypass_patch] no module %r in %s; %d adapter(s) not applied",
                            path, type(model).__name__, len(slots))
                continue
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor):
                log.warning("[freefuse_bypass_patch] module %r has no weight; %d adapter(s) not applied",
                            path, len(slots))
                continue
            fitting = []
            for slot in slots:
                fresh = slot.decision is None  # a loader's slots were decided, and logged, at their load
                if fresh:
                    slot = decided(slot, module, logical_shape(weight), can_merge=False)
                if slot.decision.fate == REFUSED:
                    level = logging.WARNING if slot.decision.unreadable else logging.ERROR
                    log.log(level, "[freefuse_bypass_patch] %s; adapter not applied", slot.decision.reason)
                    continue
                if slot.decision.fate == TRANSIENT and fresh:
                    transient[slot.decision.reason] += 1
                fitting.append(slot)
            if fitting:
                hooks.append(FusedBypassHook(module, path, fitting, layout=self.layout))
        if transient:
            log.info("[freefuse_bypass_patch] %d adapter(s) as a transient merge-code delta per forward: %s",
                     sum(transient.values()), ", ".join("%s: %d" % kv for kv in transient.items()))
        self.hooks = hooks
        return hooks

    def create_injections(self, model: torch.nn.Module,
                          modules: Optional[Mapping[str, torch.nn.Module]] = None) -> list:
        """A single PatcherInjection that attaches and detaches every hook, and the forward
        hooks that publish the patcher's token masks and LoRA switch (see :mod:`.regional`).
        The hooks are made for ``model``; a patcher that runs a copy of it (multi-GPU, the
        trainer's deep copy) gets hooks of its own on the copy (see :mod:`.copies`)."""
        from comfy.patcher_extension import PatcherInjection

        following = FollowingInjection(model, self.create_hooks(model, modules))
        self._following.append(following)  # offload() reaches the copies' hooks too
        return [PatcherInjection(inject=following.inject, eject=following.eject)]

    # -- what code written for stock's BypassInjectionManager calls (tests/test_parity.py walks it) --
    @property
    def adapters(self) -> Dict[str, List[tuple]]:
        """``{module path: [(adapter, strength, offset), ...]}``, in load order: stock keeps one
        ``(adapter, strength)`` per module; several per module is the 0.14.1 fork's form."""
        grouped: Dict[str, List[tuple]] = {}
        for slot in self.slots:
            grouped.setdefault(slot.target.module_path, []).append((slot.adapter, slot.strength, slot.target.offset))
        return grouped

    def get_hook_count(self) -> int:
        return len(self.hooks)

    def offload(self, model_patcher, unpatch_all: bool = True) -> None:
        """Upstream's ON_DETACH callback (after 0.33): trainable adapters to the patcher's offload
        device, every built form dropped, so a detached model keeps no adapter memory on its
        compute device (the next forward rebuilds them)."""
        for hook in self.hooks + [h for f in self._following for s in f.copies() for h in s.hooks]:
            hook._move_adapter_weights_to_device(model_patcher.offload_device)
