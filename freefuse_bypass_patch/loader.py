"""``load_bypass_lora_for_models`` as it should behave: bypass gives the merged result.

Differences from stock ComfyUI:

* every key form of ``load_lora`` is used (fused slices and diff functions too);
* several adapters per module, in one hook (see :mod:`.hooks`);
* chaining: the adapters of every earlier bypass LoRA on the input patcher are carried
  over (kept as an immutable tuple in a patcher attachment), so a second loader adds to
  the first instead of replacing it; the input patcher is never changed; each LoRA keeps
  its chain position and a name (:mod:`.names`, for token masks and the LoRA switch);
* one summary line; every adapter that is not applied is named in it;
* one bad key is logged and skipped; the rest of the LoRA still loads.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Tuple

import torch

from .hooks import AdapterSlot, UnreadableWeight, check_slot
from .keys import BypassKeyError, Target, parse_target
from .manager import FusedBypassManager
from .names import NAMES_ATTACHMENT, bypass_loras, next_name
from .weights import logical_shape

log = logging.getLogger(__name__)

SLOTS_ATTACHMENT = "freefuse_bypass_lora"  # tuple[AdapterSlot, ...] on a patcher
INJECTION_KEY = "bypass_lora"  # the key stock ComfyUI uses; ours replaces it
FORK_MANAGER_ATTACHMENT = "bypass_lora_manager"  # the 0.14.1 fork keeps its manager here


def previous_slots(patcher) -> Tuple[AdapterSlot, ...]:
    """Bypass adapters already on ``patcher``: ours, or the 0.14.1 fork's shared manager's."""
    attachments = getattr(patcher, "attachments", {}) or {}
    ours = attachments.get(SLOTS_ATTACHMENT)
    if ours is not None:
        return tuple(ours)
    fork_manager = attachments.get(FORK_MANAGER_ATTACHMENT)
    fork_adapters = getattr(fork_manager, "adapters", None)
    if not isinstance(fork_adapters, dict):
        return ()
    slots = []
    for module_key, entries in fork_adapters.items():
        for entry in entries if isinstance(entries, list) else [entries]:
            adapter, strength = entry[0], entry[1]
            offset = entry[2] if len(entry) > 2 else None
            weight_key = module_key + ".weight"
            slots.append(AdapterSlot(weight_key, Target(weight_key, offset), adapter, float(strength)))
    return tuple(slots)


def model_tensors(root: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Every parameter and buffer of ``root`` by state-dict name (the keys stock bypass matches).

    Not ``root.state_dict()``: a custom node may return stand-ins there (ComfyUI-GGUF gives
    meta tensors in the quantized storage shape); the tensors themselves carry the shape the
    module computes with.
    """
    tensors = dict(root.named_buffers(remove_duplicate=False))
    tensors.update(root.named_parameters(remove_duplicate=False))
    return tensors


def _owner(root: torch.nn.Module, target: Target, tensor: torch.Tensor):
    """The module whose ``weight`` is ``tensor``, or None (a LoRA on a buffer or a bias-like param)."""
    if not target.weight_key.endswith(".weight"):
        return None
    try:
        module = root.get_submodule(target.module_path)
    except AttributeError:
        return None
    return module if getattr(module, "weight", None) is tensor else None


def bypass_into(patcher, root, adapters: Dict[Any, Any], strength: float,
                errors: List[str], refused: List[str]) -> set:
    """Put the adapters that target ``root``'s weights on ``patcher`` as bypass hooks.

    Returns the load_lora keys that matched. Keys that do not fit go to ``errors``, those
    that need a weight this plugin cannot read to ``refused``. ``patcher`` must be a fresh clone.
    """
    matched = set()
    earlier = previous_slots(patcher)
    if not adapters and not earlier:
        return matched
    tensors = model_tensors(root) if adapters else {}
    names = tuple(bypass_loras(patcher)) or (("lora_0",) if earlier else ())
    name = next_name(names)  # raises before anything changes if the caller's name is taken
    new_slots = []
    for key, adapter in adapters.items():
        try:
            target = parse_target(key)
        except BypassKeyError as err:
            errors.append(str(err))
            continue
        tensor = tensors.get(target.weight_key)
        if tensor is None:
            continue
        slot = AdapterSlot(key, target, adapter, float(strength), lora=len(names))
        try:
            check_slot(slot, logical_shape(tensor), _owner(root, target, tensor))
        except UnreadableWeight as err:
            refused.append(str(err))
            continue
        except BypassKeyError as err:
            errors.append(str(err))
            continue
        matched.add(key)
        if not _finite(adapter):
            log.warning("[freefuse_bypass_patch] LoRA key %r has NaN or inf factors; applied as given", key)
        if strength != 0:
            new_slots.append(slot)
    slots = earlier + tuple(new_slots)
    if matched:
        patcher.set_attachments(NAMES_ATTACHMENT, names + (name,))
    if new_slots or earlier:
        patcher.set_attachments(SLOTS_ATTACHMENT, slots)
        patcher.set_injections(INJECTION_KEY, FusedBypassManager(slots).create_injections(root))
    return matched


def _finite(adapter) -> bool:
    """No NaN or inf in the factors (fp8 ones upcast first: ``isfinite`` has no fp8 kernel)."""
    weights = getattr(adapter, "weights", None) or ()
    return all(bool(torch.isfinite(w if w.element_size() > 1 else w.to(torch.float32)).all())
               for w in weights if isinstance(w, torch.Tensor) and w.is_floating_point())


def load_bypass_lora_for_models(model, clip, lora, strength_model, strength_clip):
    """Drop-in for ``comfy.sd.load_bypass_lora_for_models`` (same arguments, same return)."""
    import comfy.lora
    import comfy.lora_convert
    from comfy.weight_adapter import WeightAdapterBase

    key_map: Dict[str, Any] = {}
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora), key_map)

    adapters = {k: v for k, v in loaded.items() if isinstance(v, WeightAdapterBase)}
    regular = {k: v for k, v in loaded.items() if k not in adapters}
    applied: set = set()
    errors: List[str] = []
    refused: List[str] = []

    new_model = None
    if model is not None:
        new_model = model.clone()
        if regular:
            applied.update(new_model.add_patches(regular, strength_model))
        applied |= bypass_into(new_model, new_model.model, adapters, strength_model, errors, refused)

    new_clip = None
    if clip is not None:
        new_clip = clip.clone()
        if regular:
            applied.update(new_clip.add_patches(regular, strength_clip))
        applied |= bypass_into(new_clip.patcher, new_clip.cond_stage_model, adapters, strength_clip, errors,
                               refused)

    _report(len(lora), loaded, adapters, applied, errors, refused)
    return new_model, new_clip


def _report(n_tensors, loaded, adapters, applied, errors, refused) -> None:
    """One line per misfit key (ERROR), then one summary line: WARNING when anything was not
    applied, naming it (and, for adapters refused because their weight cannot be read, why)."""
    for err in errors:
        log.error("[freefuse_bypass_patch] %s; adapter skipped", err)
    why = "; refused: %s" % "; ".join(refused) if refused else ""
    if not applied:
        if refused:
            log.warning("[freefuse_bypass_patch] bypass LoRA: nothing applied%s", why)
        elif n_tensors:
            log.warning("[freefuse_bypass_patch] bypass LoRA: 0 of %d keys matched this model "
                        "(a LoRA for another architecture?)", n_tensors)
        else:
            log.warning("[freefuse_bypass_patch] bypass LoRA is empty: nothing to apply")
        return
    bypassed = [k for k in adapters if k in applied]
    fused = sum(1 for k in bypassed if isinstance(k, tuple) and len(k) > 1 and k[1] is not None)
    funcs = sum(1 for k in bypassed if isinstance(k, tuple) and len(k) > 2)
    missing = [k for k in loaded if k not in applied]
    line = ("[freefuse_bypass_patch] bypass LoRA: %d adapters in bypass (%d on fused slices, "
            "%d with a diff function), %d regular patches" % (
                len(bypassed), fused, funcs, len(applied) - len(bypassed)))
    if missing:
        log.warning("%s; NOT applied (%d): %s%s", line, len(missing), ", ".join(map(str, missing)), why)
    else:
        log.info(line)
