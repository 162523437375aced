"""Per-LoRA token masks: each bypass LoRA confined to its own region (FreeFuse's semantics).

``out = f(x) + Σ_i m_i ⊙ Δ_i(x)``: in a masked module, LoRA i's term is scaled per token
by its mask. Image masks cover the image tokens (a flat ``(N,)``/``(B, N)`` mask in the
forward's row-major order, or an ``(H, W)`` grid of any size, resized to each grid it
meets); text masks cover the prompt's tokens in the modules that see them. Which module
sees which tokens is :mod:`.layouts`' job; :mod:`.regional` fits the masks to each forward.
Masks live on the patcher (attachments, replaced, never mutated, so clones keep their
own) and are checked here, when they are set: a tensor of 1 or 2 dimensions, real,
finite; they are kept as fp32 copies and moved to the forward's device when used.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch

from .layouts import FAMILY_NAMES, TEXT_LAYOUTS, LoraMaskError, token_layout
from .names import LoraKey, attachments, bypass_loras, lora_name, position

MASKS_ATTACHMENT = "freefuse_bypass_masks"  # {chain position: image mask} on a model patcher
TEXT_MASKS_ATTACHMENT = "freefuse_bypass_text_masks"  # {chain position: text mask}

MaskKey = LoraKey
Masks = Mapping[LoraKey, Optional[torch.Tensor]]

__all__ = ["LoraMaskError", "bypass_loras", "lora_name", "lora_masks", "lora_text_masks", "set_lora_masks",
           "with_lora_masks", "MASKS_ATTACHMENT", "TEXT_MASKS_ATTACHMENT"]


def lora_masks(patcher) -> Dict[str, Optional[torch.Tensor]]:
    """The image masks on ``patcher``, by LoRA name (None: unmasked)."""
    masks = attachments(patcher).get(MASKS_ATTACHMENT) or {}
    return {name: masks.get(i) for i, name in enumerate(bypass_loras(patcher))}


def lora_text_masks(patcher) -> Dict[str, Optional[torch.Tensor]]:
    """The text masks on ``patcher``, by LoRA name (None: unmasked)."""
    masks = attachments(patcher).get(TEXT_MASKS_ATTACHMENT) or {}
    return {name: masks.get(i) for i, name in enumerate(bypass_loras(patcher))}


def with_lora_masks(patcher, masks: Masks, text_masks: Optional[Masks] = None):
    """A clone of ``patcher`` with these masks set (or cleared, with None); ``patcher`` is unchanged."""
    clone = patcher.clone()
    set_lora_masks(clone, masks, text_masks)
    return clone


def set_lora_masks(patcher, masks: Masks, text_masks: Optional[Masks] = None) -> None:
    """Set, replace or clear (None) masks on ``patcher`` itself, e.g. between sampling steps.

    Keys are chain positions (int) or names (str). An image mask is ``(N_img,)``,
    ``(B, N_img)`` or a grid ``(H, W)`` of any size; a text mask ``(N_txt,)`` or ``(B, N_txt)``
    (the prompt's tokens as the diffusion model gets them). Soft values are allowed. A bad
    key or mask raises :class:`LoraMaskError` and changes nothing.
    """
    names = bypass_loras(patcher)
    model = getattr(patcher.model, "diffusion_model", None)
    image = _updated(patcher, MASKS_ATTACHMENT, masks, names, "image")
    text = _updated(patcher, TEXT_MASKS_ATTACHMENT, text_masks or {}, names, "text")
    layout = token_layout(model) if model is not None else None
    kind = type(model if model is not None else patcher.model).__name__
    if image and layout is None:
        raise LoraMaskError("token masks need a known token layout (%s); %s is not supported" % (FAMILY_NAMES, kind))
    if text and layout not in TEXT_LAYOUTS:
        raise LoraMaskError("text masks need a model whose masked modules see the text (Flux, Flux2, Chroma, SD3, "
                            "Lumina2, Z-Image); on %s no masked module does" % kind)
    patcher.set_attachments(MASKS_ATTACHMENT, image)
    patcher.set_attachments(TEXT_MASKS_ATTACHMENT, text)


def _updated(patcher, attachment: str, masks: Masks, names, kind: str) -> Dict[int, torch.Tensor]:
    """The patcher's current masks of ``kind`` with ``masks`` applied, each checked and copied."""
    current = dict(attachments(patcher).get(attachment) or {})
    for key, mask in masks.items():
        i = position(key, names, LoraMaskError)
        if mask is None:
            current.pop(i, None)
        else:
            current[i] = _checked(mask, names[i], kind)
    return current


def _checked(mask, name: str, kind: str) -> torch.Tensor:
    """An fp32 copy of ``mask`` (the caller may reuse its tensor), or LoraMaskError saying what is wrong."""
    expected = "(N_img,), (B, N_img) or (H, W)" if kind == "image" else "(N_txt,) or (B, N_txt)"
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (1, 2) or mask.numel() == 0:
        raise LoraMaskError("%s mask for LoRA %r: expected a non-empty tensor of shape %s, got %s"
                            % (kind, name, expected, _shape(mask)))
    if mask.is_complex():
        raise LoraMaskError("%s mask for LoRA %r: expected real values, got %s" % (kind, name, mask.dtype))
    try:
        copy = mask.detach().to(torch.float32, copy=True)
    except (RuntimeError, TypeError) as err:
        raise LoraMaskError("%s mask for LoRA %r: %s does not convert to float: %s" % (kind, name, mask.dtype, err))
    if not bool(torch.isfinite(copy).all()):
        raise LoraMaskError("%s mask for LoRA %r (shape %s) has NaN or Inf values" % (kind, name, tuple(mask.shape)))
    return copy


def _shape(mask) -> str:
    return str(tuple(mask.shape)) if isinstance(mask, torch.Tensor) else type(mask).__name__
