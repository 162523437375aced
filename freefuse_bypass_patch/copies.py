"""Bypass hooks that follow the patcher's model into the copies ComfyUI makes of it.

``ModelPatcher.clone()`` copies a patcher's injections by reference, and some clones get
another torch model: ``deepclone_multigpu`` and ``match_multigpu_clones`` (one per extra
GPU, matched again at every sampling), ``clone(force_deepcopy=True)`` (the trainer) and
``clone(disable_dynamic=True)``. Merged patches follow such a copy; hooks bound to the
model an injection was made for would not, and the copy would run the base model. So an
injection keeps one :class:`HookSet` per torch model it is injected into: the model it was
made for gets the hooks the manager built (exactly as before), and each copy gets its own,
built on its first inject from the same decided slots (modules found by path) with its own
regional watch, so the copy's patcher's masks and switch act on it. Copies are cached
weakly: a copy's hooks live as long as its model, never longer.
"""

from __future__ import annotations

import logging
import weakref
from typing import Dict, List, Optional

import torch

from .hooks import FusedBypassHook
from .regional import ForwardState

log = logging.getLogger(__name__)


class HookSet:
    """The hooks of one torch model, and the watch that hands them its patcher's masks and switch."""

    def __init__(self, hooks: List[FusedBypassHook]):
        self.hooks = hooks
        self.state = ForwardState()
        for hook in hooks:  # each hook gets the source of its per-forward state (masks, switch)
            hook.mask_source = self.state.source
        self._handles: list = []

    def attach(self, root: torch.nn.Module, patcher) -> None:
        patches = getattr(patcher, "patches", None) or {}
        composed, named = {"factored": [], "replayed": []}, []
        for hook in self.hooks:
            how, cannot = hook.compose(patches.get(hook.weight_key, ()))  # patches added after its adapters
            hook.attach()
            if how:
                composed[how].append(hook.module_path)
            if cannot:
                named.append(cannot)
        _say(composed, named)
        if not self._handles:
            self._handles.extend(self.state.watch(root, patcher))

    def detach(self) -> None:
        for hook in self.hooks:
            hook.detach()
        while self._handles:
            self._handles.pop().remove()


def _say(composed: Dict[str, List[str]], named: List[str]) -> None:
    """One line for what the weights' later patches made of the bypass adapters at this inject."""
    how = {"factored": "the later merged LoRAs undone and redone around the adapters in their factored forms "
                       "(no full-size work)",
           "replayed": "composed in load order through ComfyUI's merge code in each forward (fp32, full-size and "
                       "dropped at once)"}
    for kind, paths in composed.items():
        if paths:
            log.info("[freefuse_bypass_patch] %d module(s) have patches added after bypass adapters that read the "
                     "weight or output (%s%s): %s", len(paths), ", ".join(paths[:3]), ", ..." if len(paths) > 3 else "",
                     how[kind])
    if named:
        log.warning("[freefuse_bypass_patch] patches added after bypass adapters cannot be undone from the weight "
                    "in %d module(s): bypass applies those adapters as if the later patches came first; merged "
                    "applies them in load order (load the bypass LoRA last for the merged result): %s",
                    len(named), "; ".join(named))


class FollowingInjection:
    """``inject``/``eject`` of one PatcherInjection: they act on the hooks of the model being run.

    ``model`` is the model the hooks were made for; an inject without a patcher, or with a
    patcher whose model is (or holds) it, uses them. Any other patcher model is a copy.
    """

    def __init__(self, model: torch.nn.Module, hooks: List[FusedBypassHook]):
        self.model = model
        self.home = HookSet(hooks)
        self._copies: "weakref.WeakKeyDictionary[torch.nn.Module, HookSet]" = weakref.WeakKeyDictionary()
        self._path: Optional[str] = None  # where the model sits in its patcher's model ("": it is that model)

    def inject(self, model_patcher=None) -> None:
        root = getattr(model_patcher, "model", None)
        if root is None or root is self.model:
            self.home.attach(self.model, model_patcher)
            return
        hook_set = self._copies.get(root)
        if hook_set is None:
            hook_set = self._copies[root] = self._for(root, model_patcher)
        hook_set.attach(self._target(root) if hook_set is not self.home else self.model, model_patcher)

    def eject(self, model_patcher=None) -> None:
        root = getattr(model_patcher, "model", None)
        hook_set = self.home if root is None or root is self.model else self._copies.get(root)
        if hook_set is not None:  # a copy never injected has nothing to detach
            hook_set.detach()

    def copies(self) -> List[HookSet]:
        """The hook sets of the copies alive now (not the made-for model's)."""
        return [s for s in list(self._copies.values()) if s is not self.home]

    def _for(self, root: torch.nn.Module, patcher) -> HookSet:
        if self._path is None:  # learnt once, from the patcher or a clone parent whose model holds ours
            p, seen = patcher, set()
            while p is not None and self._path is None:
                model = getattr(p, "model", None)
                if id(model) not in seen:
                    seen.add(id(model))
                    self._path = _path_in(model, self.model)
                p = getattr(p, "parent", None)
        target = self._target(root)
        if target is self.model:  # an injection made for a submodule, injected with its patcher
            return self.home
        if target is None or type(target) is not type(self.model):
            log.warning("[freefuse_bypass_patch] bypass LoRA injected into a %s that holds no copy of the %s its "
                        "hooks were made for; not applied there", type(root).__name__, type(self.model).__name__)
            return HookSet([])
        hooks = []
        for hook in self.home.hooks:  # the same slots, decided at load: only the modules change
            try:
                module = target.get_submodule(hook.module_path)
            except AttributeError:
                log.warning("[freefuse_bypass_patch] no module %r in this copy of %s; %d adapter(s) not applied "
                            "there", hook.module_path, type(target).__name__, len(hook.slots))
                continue
            hooks.append(FusedBypassHook(module, hook.module_path, hook.slots, layout=hook.layout))
        return HookSet(hooks)

    def _target(self, root: torch.nn.Module) -> Optional[torch.nn.Module]:
        """What in ``root`` stands where our model stands in its patcher's model (not kept: a
        weak cache's value must not hold its key)."""
        try:
            return root.get_submodule(self._path or "")
        except AttributeError:
            return None


def _path_in(root: Optional[torch.nn.Module], module: torch.nn.Module) -> Optional[str]:
    if not isinstance(root, torch.nn.Module):
        return None
    if root is module:
        return ""
    return next((name for name, m in root.named_modules() if m is module), None)
