"""Patches added to a weight after its bypass adapters, composed as ``calculate_weight`` composes them.

Merged applies every patch of a weight in load order: a merged LoRA loaded after a bypass one,
a model merge (``add_patches(model2, 1 - ratio, ratio)``: the weight so far times ``ratio``,
plus model2's) and the bypass adapters themselves. A hook sees the weight with every patch in
it (W') and none of the bypass adapters. What it adds must be what merged adds at the
adapter's place in that order. Each slot records how many patches its weight had at load
(``AdapterSlot.patched``); at inject the hook compares that with the patcher's patches now.

A later patch is *affine* when it maps the weight to ``s·W + d`` with ``d`` free of W
(``s``: its ``strength_model``): a diff (a model merge's model2, with its own patches), a
LoRA, LoHa or LoKr without DoRA. After affine patches only:

* an additive adapter (its term free of W' and the output) is scaled by the product of the
  later ``s``: exact, and free;
* an adapter that reads W' or the output (DoRA, GLoRA, OFT, BOFT, a weight-reading transient)
  is *replayed*: in each forward, W' is read, the later patches are undone (``(W - d) / s``,
  in reverse), and the module's adapters and those patches are applied again in load order
  by the merge code (fp32, full-size and dropped at once, as a transient adapter's delta);
  the difference from W' is each LoRA's term, masked and switched per LoRA as usual.

  When the later patches are all merged LoRAs (LoHa, LoKr) after every adapter of the module
  (LoraLoaderBypass -> LoraLoaderModelOnly, the common chain) and every one of them has a
  factored form, the replay needs no full-size work: :func:`around` gives them as factored
  slots, with minus their strength before the module's forms (W' and the output then read as
  before those patches) and with it after them (added back), built and applied like any other.

A later patch that is not affine (a merged DoRA, OFT or GLoRA, a ``set``, a scale on a slice)
cannot be undone from W': the adapters before it are named once, with the keys, and applied
as if it came first.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, FrozenSet, NamedTuple, Optional, Sequence, Tuple

import torch

from .keys import Target
from .slots import FACTORED, AdapterSlot, decide, weight_dependent

MERGED_LORA = -1  # the chain position of a later merged patch around a module's forms: no mask, no switch


class Composition(NamedTuple):
    """What a module's later patches do to its bypass adapters (see the module docstring)."""

    scales: Dict[int, float]  # id(slot) -> the product of the later strength_model (additive slots)
    replay: Optional[Tuple[int, Tuple[AdapterSlot, ...]]]  # (first patch undone, slots replayed), or None
    inexact: Tuple[AdapterSlot, ...]  # slots with a later patch that cannot be undone: named
    blockers: Tuple[str, ...]  # those patches, as the message names them


NOTHING = Composition({}, None, (), ())


def describe(patch: tuple) -> str:
    """A patch as a message names it: ``LoRA``, ``OFT``, ``LoRA (DoRA)``, ``diff``, ``set``..."""
    v = patch[1]
    if isinstance(v, list):
        return "diff (another model's weight)"
    if isinstance(v, tuple):
        return str(v[0]) if len(v) == 2 and isinstance(v[0], str) else "diff"
    return adapter_kind(v)


def adapter_kind(adapter: Any) -> str:
    """An adapter as a message names it: ``LoRA``, ``LoKr``, ``OFT``, ``LoRA (DoRA)``..."""
    name = type(adapter).__name__.replace("Adapter", "")
    dora = getattr(adapter, "name", None) in ("lora", "loha", "lokr") and weight_dependent(adapter)
    return name + " (DoRA)" if dora else name


def affine(patch: tuple) -> bool:
    """Does ``patch`` map the weight to ``s·W + d`` with ``d`` free of W, on the whole of it?"""
    v, scale, offset = patch[1], float(patch[2]), patch[3]
    if scale != 1.0 and offset is not None:
        return False  # a scale on a slice: no single s for the adapters' terms
    if isinstance(v, list):  # model2's weight and its patches, as get_key_patches gives them
        return True
    if isinstance(v, tuple):
        if len(v) == 1:
            return True
        inner = v[1] if len(v) == 2 else None
        return v[0] == "diff" and isinstance(inner, (tuple, list)) and not (
            len(inner) > 1 and isinstance(inner[1], dict) and inner[1].get("pad_weight"))
    if getattr(v, "name", None) not in ("lora", "loha", "lokr") or weight_dependent(v):
        return False
    weights = getattr(v, "weights", ())
    return not (v.name == "lora" and len(weights) > 5 and weights[5] is not None)  # a reshape pads W


def compose(slots: Sequence[AdapterSlot], patches: Sequence[tuple],
            additive: Callable[[AdapterSlot], bool]) -> Composition:
    """The composition of ``patches`` (the weight's patches now) with ``slots`` (its bypass
    adapters in load order, trainable ones left out); ``additive`` tells the slots whose term
    is free of W' and the output."""
    scales, inexact, blockers, replayed = {}, [], set(), False
    for slot in slots:
        later = patches[slot.patched:] if 0 <= slot.patched < len(patches) else ()
        if not later:
            continue
        bad = [p for p in later if not affine(p)]
        if bad:
            inexact.append(slot)
            blockers.update(describe(p) for p in bad)
        elif additive(slot):
            scale = math.prod(float(p[2]) for p in later)
            if scale != 1.0:
                scales[id(slot)] = scale
        else:
            replayed = True
    replay = None
    if replayed and not inexact and all(s.patched >= 0 for s in slots):
        # a scale of 0 wipes what came before it: those slots add nothing, and nothing undoes it
        zeroed = max((i for i, p in enumerate(patches) if float(p[2]) == 0.0), default=-1)
        live = tuple(s for s in slots if s.patched > zeroed)
        replay = (min(s.patched for s in live), live) if live else (len(patches), ())
    elif replayed:
        inexact.extend(s for s in slots if s not in inexact and not additive(s)
                       and 0 <= s.patched < len(patches))
        if any(s.patched < 0 for s in slots):
            blockers.add("a bypass adapter of unknown place (loaded by the 0.14.1 fork)")
    return Composition(scales, replay, tuple(inexact), tuple(sorted(blockers)))


FormSlots = Tuple[Tuple[AdapterSlot, type], ...]


def around(patches: Sequence[tuple], module: torch.nn.Module, shape: Sequence[int], weight_key: str
           ) -> Optional[Tuple[FormSlots, FormSlots]]:
    """``patches`` (merged after every adapter of the module) as (undo, redo): factored slots with
    minus and plus their strength, or None when one of them has no additive factored form here
    (a diff, a scale, a slice on the input axis...): the module is then replayed in full."""
    undo, redo = [], []
    for i, patch in enumerate(patches):
        strength, adapter, scale, offset, function = patch[:5]
        if float(scale) != 1.0 or not affine(patch) or isinstance(adapter, (tuple, list)):
            return None
        slot = AdapterSlot(("merged after", weight_key, i), Target(weight_key, offset, function), adapter,
                           float(strength), lora=MERGED_LORA)
        decision = decide(slot, module, shape, can_merge=False)
        form = decision.form
        if decision.fate != FACTORED or form is None or form.needs_weight or form.reads_output:
            return None
        undo.append((AdapterSlot(slot.key, slot.target, adapter, -float(strength), MERGED_LORA, decision), form))
        redo.append((AdapterSlot(slot.key, slot.target, adapter, float(strength), MERGED_LORA, decision), form))
    return tuple(undo), tuple(redo)


def merged(slots: Sequence[AdapterSlot], weight: torch.Tensor) -> torch.Tensor:
    """``weight`` patched by ``slots`` in order, by ComfyUI's merge code, in fp32."""
    import comfy.lora

    patches = [(s.strength, s.adapter, 1.0, s.target.offset, s.target.function) for s in slots]
    return comfy.lora.calculate_weight(patches, weight, slots[0].target.weight_key, intermediate_dtype=torch.float32)


def replay(slots: Sequence[AdapterSlot], patches: Sequence[tuple], start: int, weight: torch.Tensor,
           off: FrozenSet[int] = frozenset(), per_lora: bool = False) -> Dict[int, torch.Tensor]:
    """What the bypass ``slots`` add to ``weight`` (W', fp32, every patch in it) where merged
    applies them among ``patches[start:]``: one fp32 delta per LoRA (``per_lora``), else one
    for all (key 0). LoRAs in ``off`` are left out, as if never loaded."""
    import comfy.lora

    key = slots[0].target.weight_key if slots else ""
    base = weight.clone()  # W' without the later patches: undone in reverse
    for patch in reversed(patches[start:]):
        base.sub_(comfy.lora.calculate_weight([patch[:2] + (1.0,) + tuple(patch[3:])], torch.zeros_like(base), key,
                                              intermediate_dtype=torch.float32))
        if float(patch[2]) != 1.0:
            base.div_(float(patch[2]))
    deltas: Dict[int, torch.Tensor] = {}
    cursor = start
    for slot in slots:
        base, cursor = _redo(patches[cursor:max(cursor, slot.patched)], base, deltas, key), max(cursor, slot.patched)
        if slot.lora in off:
            continue
        current = base + sum(deltas.values()) if deltas else base.clone()
        delta = merged((slot,), current.clone()).sub_(current)
        del current
        group = slot.lora if per_lora else 0
        deltas[group] = deltas[group].add_(delta) if group in deltas else delta
    _redo(patches[cursor:], base, deltas, key)
    return deltas


def _redo(patches: Sequence[tuple], base: torch.Tensor, deltas: Dict[int, torch.Tensor], key: str) -> torch.Tensor:
    """Apply affine ``patches`` to ``base``; their scale applies to the adapters' deltas so far too."""
    import comfy.lora

    for patch in patches:
        base = comfy.lora.calculate_weight([patch], base, key, intermediate_dtype=torch.float32)
        if float(patch[2]) != 1.0:
            for delta in deltas.values():
                delta.mul_(float(patch[2]))
    return base
