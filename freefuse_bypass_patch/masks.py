"""Per-LoRA token masks on the fused hook: each bypass LoRA confined to its own region.

``out = f(x) + Σ_i m_i ⊙ Δ_i(x)``: LoRA i's term in a module is scaled per token by its mask
(FreeFuse's semantics). Masks cover the image tokens and live on the patcher (an attachment,
replaced, never mutated, so clones keep their own). Modules inside the blocks receive no
per-call information, so a forward pre-hook on the diffusion model publishes what a hook
needs (batch, token grid, text length) for the forward in flight, and each hook asks
:func:`masks_for_hook` for its per-token scales, by the role of its module:

* ``image``: the module sees image tokens only (Flux-like ``double_blocks.N.img_attn/img_mlp``,
  SD3 ``joint_blocks.N.x_block``): masked; tokens after the grid (reference latents) are not;
* ``joint``: text tokens then image tokens (Flux-like ``single_blocks.N.linear1/linear2``):
  text unmasked, image masked;
* anything else (text side, modulation, modules outside the blocks): not masked.

Families whose token layout is not known here (Lumina2/Z-Image, PixArt, ...) are refused
with an error: a mask is never applied to the wrong tokens.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
import weakref
from typing import Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch

from .hooks import FusedBypassHook

MASKS_ATTACHMENT = "freefuse_bypass_masks"  # {chain position: tensor} on a model patcher
NAMES_ATTACHMENT = "freefuse_bypass_lora_names"  # tuple of LoRA names, in chain order

MaskKey = Union[int, str]


class LoraMaskError(ValueError):
    """A mask that does not fit the LoRAs on the patcher, its model or the running forward."""


# -- token layouts -------------------------------------------------------------------
# layout -> [(module path pattern, role)]; the first match wins
_LAYOUTS = {
    "flux": [(re.compile(r"(^|\.)double_blocks\.\d+\.img_(attn|mlp)\."), "image"),
             (re.compile(r"(^|\.)single_blocks\.\d+\.linear[12]$"), "joint")],
    "sd3": [(re.compile(r"(^|\.)joint_blocks\.\d+\.x_block\.(attn2?|mlp)\."), "image")],
}


def token_layout(diffusion_model: torch.nn.Module) -> Optional[str]:
    """``flux`` (Flux, Flux2/Klein, Chroma), ``sd3`` (MMDiT) or None (masks refused)."""
    module = type(diffusion_model).__module__
    if hasattr(diffusion_model, "double_blocks") and hasattr(diffusion_model, "single_blocks") and (
            module.startswith("comfy.ldm.flux") or module.startswith("comfy.ldm.chroma")):
        return "flux"
    if hasattr(diffusion_model, "joint_blocks") and module.startswith("comfy.ldm.modules.diffusionmodules.mmdit"):
        return "sd3"
    return None


def module_role(module_path: str, layout: Optional[str]) -> Optional[str]:
    for pattern, role in _LAYOUTS.get(layout, ()):
        if pattern.search(module_path):
            return role
    return None


# -- the public API --------------------------------------------------------------------
def bypass_loras(patcher) -> List[str]:
    """Names of the bypass LoRAs on ``patcher``, in chain order (position = index)."""
    return list(_attachments(patcher).get(NAMES_ATTACHMENT, ()))


def lora_masks(patcher) -> Dict[str, Optional[torch.Tensor]]:
    """The masks on ``patcher``, by LoRA name (None: unmasked)."""
    masks = _attachments(patcher).get(MASKS_ATTACHMENT) or {}
    return {name: masks.get(i) for i, name in enumerate(bypass_loras(patcher))}


def with_lora_masks(patcher, masks: Mapping[MaskKey, Optional[torch.Tensor]]):
    """A clone of ``patcher`` with ``masks`` set (or cleared, with None); ``patcher`` is unchanged."""
    clone = patcher.clone()
    set_lora_masks(clone, masks)
    return clone


def set_lora_masks(patcher, masks: Mapping[MaskKey, Optional[torch.Tensor]]) -> None:
    """Set, replace or clear (None) masks on ``patcher`` itself, e.g. between sampling steps.

    Keys are chain positions (int) or names (str). A mask is ``(N_img,)``, ``(B, N_img)`` or
    the token grid ``(H_tok, W_tok)``, float (soft masks allowed); it is checked against the
    image tokens of each forward.
    """
    names = bypass_loras(patcher)
    current = dict(_attachments(patcher).get(MASKS_ATTACHMENT) or {})
    for key, mask in masks.items():
        position = _position(key, names)
        if mask is None:
            current.pop(position, None)
            continue
        if not isinstance(mask, torch.Tensor) or mask.dim() not in (1, 2) or mask.numel() == 0:
            raise LoraMaskError("mask for LoRA %r: expected a tensor of shape (N_img,), (B, N_img) or "
                                "(H_tok, W_tok), got %s" % (names[position], _shape(mask)))
        current[position] = mask.detach().to(torch.float32, copy=True)  # the caller may reuse its tensor
    if current:
        layout = token_layout(patcher.model.diffusion_model)
        if layout is None:
            raise LoraMaskError("token masks need a known token layout (Flux, Flux2, Chroma, SD3); "
                                "%s is not supported" % type(patcher.model.diffusion_model).__name__)
    patcher.set_attachments(MASKS_ATTACHMENT, current)


@contextlib.contextmanager
def lora_name(name: str) -> Iterator[None]:
    """Name the bypass LoRA loaded inside this block (default: ``lora_<position>``)."""
    if not isinstance(name, str) or not name:
        raise ValueError("a LoRA name must be a non-empty string, got %r" % (name,))
    _pending.names.append(name)
    try:
        yield
    finally:
        _pending.names.pop()


class _Pending(threading.local):
    def __init__(self):
        self.names: List[str] = []
        self.forwards: List["_Forward"] = []


_pending = _Pending()


def next_name(names: Tuple[str, ...]) -> str:
    """The name for the next LoRA of a chain (the innermost ``lora_name`` block, else ``lora_<n>``)."""
    name = _pending.names[-1] if _pending.names else "lora_%d" % len(names)
    if name in names:
        raise ValueError("a bypass LoRA named %r is already on this model (%s)" % (name, ", ".join(names)))
    return name


def _position(key: MaskKey, names: List[str]) -> int:
    if not names:
        raise LoraMaskError("this patcher has no bypass LoRAs (load them with load_bypass_lora_for_models)")
    if isinstance(key, bool) or not isinstance(key, (int, str)) or \
            (isinstance(key, int) and not 0 <= key < len(names)) or (isinstance(key, str) and key not in names):
        raise LoraMaskError("no bypass LoRA %r on this patcher; its LoRAs: %s"
                            % (key, ", ".join("%d: %s" % item for item in enumerate(names))))
    return key if isinstance(key, int) else names.index(key)


def _attachments(patcher) -> dict:
    return getattr(patcher, "attachments", None) or {}


def _shape(mask) -> str:
    return str(tuple(mask.shape)) if isinstance(mask, torch.Tensor) else type(mask).__name__


# -- per forward ---------------------------------------------------------------------
class _Forward:
    """What the hooks of one diffusion-model forward need: each LoRA's mask over that forward's tokens."""

    def __init__(self, layout: str, masks: Dict[int, torch.Tensor], names, batch: int, grid: Tuple[int, int],
                 text_tokens: int):
        self.layout, self.batch, self.grid, self.text_tokens = layout, batch, grid, text_tokens
        self.image_tokens = grid[0] * grid[1]
        self.masks = {i: self._fit(m, names[i] if i < len(names) else str(i)) for i, m in masks.items()}
        self._scales: Dict[Tuple[str, int, torch.dtype, torch.device], Dict[int, torch.Tensor]] = {}

    def _fit(self, mask: torch.Tensor, name: str) -> torch.Tensor:
        """(batch or 1, image tokens), or an error naming the mask's and the forward's shapes."""
        n, (h, w) = self.image_tokens, self.grid
        if mask.shape in ((h, w), (n,)):
            return mask.reshape(1, n)
        if mask.shape == (self.batch, n):
            return mask
        raise LoraMaskError("mask for LoRA %r has shape %s; this forward has %d image tokens in a %dx%d grid "
                            "and batch %d: expected (%d,), (%d, %d) or (%d, %d)"
                            % (name, tuple(mask.shape), n, h, w, self.batch, n, self.batch, n, h, w))

    def scales(self, role: str, x: torch.Tensor) -> Dict[int, torch.Tensor]:
        """{LoRA position: (tokens, 1)} for a module of ``role`` whose input is ``x`` (B, N, C)."""
        batch, tokens = x.shape[0], x.shape[1]
        key = (role, tokens, x.dtype, x.device)
        cached = self._scales.get(key)
        if cached is not None:
            return cached
        before = self.text_tokens if role == "joint" else 0
        after = tokens - before - self.image_tokens
        if batch != self.batch or after < 0:
            raise LoraMaskError("a %s module got input %s, but this forward has batch %d, %d text and %d image "
                                "tokens: masks cannot be placed" % (role, tuple(x.shape), self.batch,
                                                                  self.text_tokens, self.image_tokens))
        dtype = x.dtype if x.dtype.is_floating_point else torch.float32
        out = {}
        for i, mask in self.masks.items():
            mask = mask.to(device=x.device, dtype=dtype).expand(batch, -1)
            parts = [mask.new_ones(batch, before), mask, mask.new_ones(batch, after)]
            out[i] = torch.cat(parts, dim=1).reshape(-1, 1)
        self._scales[key] = out
        return out


def masks_for_hook(hook: FusedBypassHook, x: torch.Tensor):
    """The hook's per-LoRA token scales in the forward in flight, or None (the fast path)."""
    if not _pending.forwards:
        return None
    forward = _pending.forwards[-1]
    if forward is None or x.dim() != 3:
        return None
    role = module_role(hook.module_path, forward.layout)
    if role is None:
        return None
    return forward.scales(role, x).get


FusedBypassHook.mask_source = staticmethod(masks_for_hook)


def forward_hooks(root: torch.nn.Module, patcher) -> list:
    """Hooks on ``root.diffusion_model`` that publish the masks of ``patcher`` for each forward.

    Returns the handles (empty for a model without ``diffusion_model``, e.g. a text encoder).
    """
    diffusion_model = getattr(root, "diffusion_model", None)
    if diffusion_model is None or patcher is None:
        return []
    owner = weakref.ref(patcher)

    def before(module, args, kwargs):
        _pending.forwards.append(None)  # popped by after(), even when _start raises
        _pending.forwards[-1] = _start(module, owner(), args, kwargs)

    def after(module, args, kwargs, output):
        if _pending.forwards:
            _pending.forwards.pop()

    return [diffusion_model.register_forward_pre_hook(before, with_kwargs=True),
            diffusion_model.register_forward_hook(after, with_kwargs=True, always_call=True)]


def _start(diffusion_model, patcher, args, kwargs) -> Optional[_Forward]:
    masks = _attachments(patcher).get(MASKS_ATTACHMENT) if patcher is not None else None
    if not masks:
        return None
    layout = token_layout(diffusion_model)
    if layout is None:
        raise LoraMaskError("token masks are set but %s has no known token layout"
                            % type(diffusion_model).__name__)
    x = args[0] if args else kwargs["x"]
    context = kwargs.get("context", args[2] if len(args) > 2 else None)
    patch = getattr(diffusion_model, "patch_size", 1)
    patch = patch[-1] if isinstance(patch, (tuple, list)) else int(patch)
    grid = (math.ceil(x.shape[-2] / patch), math.ceil(x.shape[-1] / patch))
    text = context.shape[1] if isinstance(context, torch.Tensor) and context.dim() == 3 else 0
    return _Forward(layout, masks, bypass_loras(patcher), x.shape[0], grid, text)
