"""The LoRA switch: each bypass LoRA on or off, per patcher, with nothing reloaded or rebuilt.

FreeFuse runs its first steps on the base model to find the regions (``disable_lora``),
then samples with the masked LoRAs. A zero mask is not the same: modules that are never
masked (text side, modulation) keep the LoRA. Off here means the LoRA adds nothing in
any module; the hooks stay attached and keep their built factors, so switching back on
gives the earlier output bit for bit, and with every LoRA off a forward is the base
model's, bit for bit. The state is a patcher attachment (a tuple of the chain positions
that are off, replaced, never mutated): clones keep their own.
"""

from __future__ import annotations

from typing import Dict, FrozenSet, Mapping

from .names import LoraKey, attachments, bypass_loras, position

OFF_ATTACHMENT = "freefuse_bypass_loras_off"  # sorted tuple of chain positions switched off


def loras_off(patcher) -> FrozenSet[int]:
    """Chain positions of the LoRAs switched off on ``patcher``."""
    return frozenset(attachments(patcher).get(OFF_ATTACHMENT, ()))


def loras_enabled(patcher) -> Dict[str, bool]:
    """``{name: on}`` for every bypass LoRA on ``patcher``, in chain order."""
    off = loras_off(patcher)
    return {name: i not in off for i, name in enumerate(bypass_loras(patcher))}


def set_loras_enabled(patcher, enabled: Mapping[LoraKey, bool]) -> None:
    """Switch LoRAs on (True) or off (False) on ``patcher`` itself; the next forward uses it.

    Keys are chain positions (int) or names (str); an unknown key raises ValueError listing
    the chain, a value that is not a bool raises TypeError, and then nothing is changed.
    """
    names = bypass_loras(patcher)
    if names and getattr(getattr(patcher, "model", None), "diffusion_model", None) is None:
        raise ValueError("the LoRA switch acts on a diffusion model's patcher; %s has none (a text encoder's LoRAs "
                         "are applied when the prompt is encoded)" % type(getattr(patcher, "model", patcher)).__name__)
    off = set(loras_off(patcher))
    for key, on in enabled.items():
        i = position(key, names)
        if not isinstance(on, bool):
            raise TypeError("LoRA %r: enabled must be True or False, got %r" % (names[i], on))
        (off.discard if on else off.add)(i)
    patcher.set_attachments(OFF_ATTACHMENT, tuple(sorted(off)))


def with_loras_enabled(patcher, enabled: Mapping[LoraKey, bool]):
    """A clone of ``patcher`` with these LoRAs switched on or off; ``patcher`` is unchanged."""
    clone = patcher.clone()
    set_loras_enabled(clone, enabled)
    return clone
