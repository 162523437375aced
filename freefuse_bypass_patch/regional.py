"""Per forward: what the hooks of one patcher need from its masks and its LoRA switch.

Modules inside the blocks receive no per-call information. So each injection gets a
:class:`ForwardState`: a forward pre-hook on the diffusion model (registered on inject,
removed on eject) reads the patcher's masks (:mod:`.masks`) and switch (:mod:`.switch`)
once per forward, fits the masks to that forward's tokens (:mod:`.layouts`) and keeps
them while it runs; the manager gives every hook :meth:`ForwardState.source`, which
answers None, after one check, when there is nothing to do (no masks, every LoRA on):
the fast path. Otherwise it answers the module's per-LoRA token scales (built once per
role and token count per forward) and the set of LoRAs switched off.
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

import torch

from .layouts import FAMILY_NAMES, Geometry, LoraMaskError, module_role, token_layout
from .masks import MASKS_ATTACHMENT, TEXT_MASKS_ATTACHMENT
from .names import attachments, bypass_loras
from .switch import OFF_ATTACHMENT

# What a hook gets for a forward: (its LoRAs' token scales, or None), chain positions switched off.
HookState = Tuple[Optional[Callable[[int], Optional[torch.Tensor]]], FrozenSet[int]]


class _Stack(threading.local):
    def __init__(self):
        self.forwards: List[Optional["_Forward"]] = []


class ForwardState:
    """The forwards in flight of one injection's diffusion model (a stack: forwards may nest)."""

    def __init__(self):
        self._stack = _Stack()

    def source(self, hook, x: torch.Tensor) -> Optional[HookState]:
        """For a hook about to add its adapters: None (nothing to do) or its state in this forward."""
        forwards = self._stack.forwards
        if not forwards:
            return None
        forward = forwards[-1]
        return forward.for_module(hook.module_path, x) if forward is not None else None

    def watch(self, root: torch.nn.Module, patcher) -> list:
        """Hooks on ``root.diffusion_model`` that publish ``patcher``'s masks and switch per forward.

        Returns the handles (none for a model without ``diffusion_model``, e.g. a text encoder).
        """
        diffusion_model = getattr(root, "diffusion_model", None)
        if diffusion_model is None or patcher is None:
            return []
        owner = weakref.ref(patcher)
        stack = self._stack

        def before(module, args, kwargs):
            stack.forwards.append(None)  # popped by after(), even when _start raises
            stack.forwards[-1] = _start(module, owner(), args, kwargs)

        def after(module, args, kwargs, output):
            if stack.forwards:
                stack.forwards.pop()

        return [diffusion_model.register_forward_pre_hook(before, with_kwargs=True),
                diffusion_model.register_forward_hook(after, with_kwargs=True, always_call=True)]


def _start(diffusion_model, patcher, args, kwargs) -> Optional["_Forward"]:
    if patcher is None:
        return None
    found = attachments(patcher)
    masks, text, off = found.get(MASKS_ATTACHMENT), found.get(TEXT_MASKS_ATTACHMENT), found.get(OFF_ATTACHMENT)
    if not (masks or text or off):
        return None
    return _Forward(diffusion_model, args, kwargs, masks or {}, text or {}, frozenset(off or ()),
                    bypass_loras(patcher))


class _Forward:
    """One forward's masks, fitted to its tokens, and its switched-off LoRAs."""

    def __init__(self, diffusion_model, args, kwargs, masks: Dict[int, torch.Tensor],
                 text: Dict[int, torch.Tensor], off: FrozenSet[int], names: List[str]):
        self.off = off
        self.unmasked: HookState = (None, off)
        self.geometry: Optional[Geometry] = None
        self.image: Dict[int, torch.Tensor] = {}
        self.text: Dict[int, torch.Tensor] = {}
        masks = {i: m for i, m in masks.items() if i not in off}  # an off LoRA adds nothing anywhere
        text = {i: m for i, m in text.items() if i not in off}
        if masks or text:
            layout = token_layout(diffusion_model)
            if layout is None:
                raise LoraMaskError("token masks are set but %s has no known token layout (%s)"
                                    % (type(diffusion_model).__name__, FAMILY_NAMES))
            geometry = self.geometry = Geometry(layout, diffusion_model, args, kwargs)
            name = lambda i: names[i] if i < len(names) else str(i)  # noqa: E731
            self.image = {i: geometry.image_grid(m, name(i)) for i, m in masks.items()}
            self.text = {i: geometry.text_rows(m, name(i)) for i, m in text.items()}
        self._scales: Dict[tuple, Optional[Callable[[int], Optional[torch.Tensor]]]] = {}
        self._resized: Dict[tuple, torch.Tensor] = {}

    def for_module(self, module_path: str, x: torch.Tensor) -> Optional[HookState]:
        if self.geometry is None or x.dim() != 3:
            return self.unmasked if self.off else None
        role = module_role(module_path, self.geometry.layout)
        scales = self.scales(role, x) if role is not None else None
        if scales is None:
            return self.unmasked if self.off else None
        return scales, self.off

    def scales(self, role: str, x: torch.Tensor) -> Optional[Callable[[int], Optional[torch.Tensor]]]:
        """{LoRA position: (batch · tokens, 1)}.get for a module of ``role`` whose input is ``x`` (B, N, C)."""
        key = (role, x.shape[1], x.dtype, x.device)
        if key in self._scales:
            return self._scales[key]
        geometry = self.geometry
        batch, tokens = x.shape[0], x.shape[1]
        runs = geometry.runs(role, tokens) if batch == geometry.batch else []
        if not runs:
            raise LoraMaskError("a module (%s tokens) got input %s, but this forward has %s: masks cannot be placed"
                                % (role, tuple(x.shape), geometry.describe()))
        dtype = x.dtype if x.dtype.is_floating_point else torch.float32
        kinds = {kind for kind, length, _ in runs if length}
        out = {}
        for i in sorted(set(self.image) | set(self.text)):
            image = self.image.get(i) if "image" in kinds else None
            text = self.text.get(i) if "text" in kinds else None
            if image is None and text is None:
                continue
            parts = []
            for kind, length, grid in runs:
                if kind == "image" and image is not None:
                    parts.append(self._image_at(i, image, grid, x.device))
                elif kind == "text" and text is not None:
                    parts.append(text.to(x.device))
                else:
                    parts.append(torch.ones(1, length, device=x.device))
            out[i] = torch.cat([p.expand(batch, -1) for p in parts], dim=1).to(dtype).reshape(-1, 1)
        self._scales[key] = scales = out.get if out else None
        return scales

    def _image_at(self, i: int, image: torch.Tensor, grid, device) -> torch.Tensor:
        key = (i, grid, device)
        resized = self._resized.get(key)
        if resized is None:
            resized = self._resized[key] = self.geometry.resize(image.to(device), grid)
        return resized
