"""``load_bypass_lora_for_models`` as it should behave: bypass gives the merged result.

Differences from stock ComfyUI:

* every key form of ``load_lora`` is used (fused slices and diff functions too);
* several adapters per module, in one hook (see :mod:`.hooks`);
* chaining: the adapters of every earlier bypass LoRA on the input patcher are carried
  over (kept as an immutable tuple in a patcher attachment), so a second loader adds to
  the first instead of replacing it; the input patcher is never changed; each LoRA keeps
  its chain position and a name (:mod:`.names`, for token masks and the LoRA switch);
* what each adapter becomes is decided here, once (:mod:`.slots`): factored, transient,
  merged (handed to ``add_patches``, as merged does) or refused; one summary line gives every
  adapter's fate, naming the transient, merged and refused ones with why;
* one bad key is logged and skipped; the rest of the LoRA still loads.
"""

from __future__ import annotations

import collections
import logging
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Tuple

import torch

from .keys import BypassKeyError, Target, parse_target
from .manager import FusedBypassManager
from .names import NAMES_ATTACHMENT, bypass_loras, next_name
from .slots import FACTORED, MERGED, REFUSED, TRANSIENT, AdapterSlot, Decision, decided
from .weights import logical_shape

log = logging.getLogger(__name__)

SLOTS_ATTACHMENT = "freefuse_bypass_lora"  # tuple[AdapterSlot, ...] on a patcher
REPORT_ATTACHMENT = "freefuse_bypass_load_report"  # LoadReport of the last bypass load onto a patcher
INJECTION_KEY = "bypass_lora"  # the key stock ComfyUI uses; ours replaces it
FORK_MANAGER_ATTACHMENT = "bypass_lora_manager"  # the 0.14.1 fork keeps its manager here
MANAGER_ATTACHMENT = "freefuse_bypass_manager"  # the FusedBypassManager of a patcher's injection
CALLBACK_KEY = "freefuse_bypass_patch"  # our ON_DETACH callback's key (upstream registers manager.offload)


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
    """Every parameter and buffer of ``root`` by state-dict name (the keys stock bypass matches)."""
    return model_index(root)[0]


def model_index(root: torch.nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.nn.Module]]:
    """Every parameter and buffer of ``root`` by state-dict name, and every module by path, from
    one walk of the tree (a lookup per adapter was a large part of a load).

    Tensors as ``named_buffers``/``named_parameters`` give them, not ``root.state_dict()``: a
    custom node may return stand-ins there (ComfyUI-GGUF gives meta tensors in the quantized
    storage shape); the tensors themselves carry the shape the module computes with.
    """
    buffers, parameters, modules = {}, {}, {}
    for path, module in root.named_modules(remove_duplicate=False):
        modules[path] = module
        prefix = path + "." if path else ""
        for name, tensor in module._buffers.items():  # what named_buffers/named_parameters walk
            if tensor is not None:
                buffers[prefix + name] = tensor
        for name, tensor in module._parameters.items():
            if tensor is not None:
                parameters[prefix + name] = tensor
    buffers.update(parameters)
    return buffers, modules


def _owner(modules: Dict[str, torch.nn.Module], target: Target, tensor: torch.Tensor):
    """The module whose ``weight`` is ``tensor``, or None (a LoRA on a buffer or a bias-like param)."""
    if not target.weight_key.endswith(".weight"):
        return None
    module = modules.get(target.module_path)  # every module of root, from the same walk as the tensors
    return module if getattr(module, "weight", None) is tensor else None


@dataclass
class LoadReport:
    """What one loader call did with each adapter, for its log lines and ``check --lora``."""

    decisions: Dict[Any, Decision] = field(default_factory=dict)  # load_lora key -> fate
    errors: List[str] = field(default_factory=list)  # malformed keys

    def counts(self) -> Dict[str, int]:
        return dict(collections.Counter(d.fate for d in self.decisions.values()))


def bypass_into(patcher, root, adapters: Dict[Any, Any], strength: float, report: LoadReport) -> set:
    """Put the adapters that target ``root``'s weights on ``patcher``: the factored and transient
    ones as bypass hooks, the merged ones through ``add_patches``; each decision goes to ``report``.

    Returns the load_lora keys that were applied. ``patcher`` must be a fresh clone.
    """
    applied = set()
    earlier = previous_slots(patcher)
    if not adapters and not earlier:
        return applied
    tensors, modules = model_index(root)
    names = tuple(bypass_loras(patcher)) or (("lora_0",) if earlier else ())
    name = next_name(names)  # raises before anything changes if the caller's name is taken
    earlier = tuple(_decide(tensors, modules, slot) for slot in earlier)  # the 0.14.1 fork's were not decided
    new_slots, merged, bypassed = [], {}, []
    for key, adapter in adapters.items():
        try:
            target = parse_target(key)
        except BypassKeyError as err:
            report.errors.append(str(err))
            continue
        if target.weight_key not in tensors:
            continue  # another model's key (the text encoder's, say)
        patched = len((getattr(patcher, "patches", None) or {}).get(target.weight_key, ()))  # what comes before it
        slot = _decide(tensors, modules, AdapterSlot(key, target, adapter, float(strength), lora=len(names),
                                                  patched=patched))
        report.decisions[key] = slot.decision
        if slot.decision.fate == REFUSED:
            continue
        applied.add(key)
        if slot.decision.fate == MERGED:
            merged[key] = adapter
            continue
        bypassed.append((key, adapter))
        if strength != 0:
            new_slots.append(slot)
    for key in _nonfinite(bypassed):
        log.warning("[freefuse_bypass_patch] LoRA key %r has NaN or inf factors; applied as given", key)
    if merged:
        patcher.add_patches(merged, strength)
    slots = earlier + tuple(new_slots)
    if applied:
        patcher.set_attachments(NAMES_ATTACHMENT, names + (name,))
    if new_slots or earlier:
        patcher.set_attachments(SLOTS_ATTACHMENT, slots)
        manager = FusedBypassManager(slots)
        patcher.set_injections(INJECTION_KEY, manager.create_injections(root, modules))
        patcher.set_attachments(MANAGER_ATTACHMENT, manager)
        _offload_on_detach(patcher)
        for hook in manager.hooks:  # a form after a transient adapter that it reads runs in the merge code
            for slot in hook.demoted:
                if slot.key in report.decisions and slot.lora == len(names):
                    report.decisions[slot.key] = replace(slot.decision, fate=TRANSIENT, form=None, reason=(
                        "after a transient adapter of its module that it reads, in load order"))
    return applied


_NAMED_LEFT_OUT: "weakref.WeakSet" = weakref.WeakSet()


def name_bypass_left_out(patcher) -> None:
    """After ``get_key_patches`` on a patcher with bypass LoRAs (a model merge reading model2, a
    save): they are forward hooks, not weight patches, so what is built from the key patches
    goes without them. Said once per patcher."""
    slots = (getattr(patcher, "attachments", None) or {}).get(SLOTS_ATTACHMENT)
    if not slots or patcher in _NAMED_LEFT_OUT:
        return
    try:
        _NAMED_LEFT_OUT.add(patcher)
    except TypeError:
        pass
    log.warning("[freefuse_bypass_patch] the weights of a model with %d bypass adapter(s) (LoRAs %s) were read "
                "with get_key_patches (a model merge's model2, a save): bypass LoRAs are hooks, not weight patches, "
                "so they are not in what is built from them; load them merged (LoraLoader) to carry them",
                len(slots), ", ".join(bypass_loras(patcher)) or "?")


def _offload_on_detach(patcher) -> None:
    """Register, once per patcher chain, the ON_DETACH callback that upstream's loader registers
    after 0.33 (``manager.offload``): it offloads the manager of the patcher being detached."""
    try:
        from comfy.patcher_extension import CallbacksMP
    except ImportError:
        return
    on_detach = getattr(CallbacksMP, "ON_DETACH", None)
    if on_detach is None or not hasattr(patcher, "add_callback_with_key"):
        return
    if not patcher.callbacks.get(on_detach, {}).get(CALLBACK_KEY):
        patcher.add_callback_with_key(on_detach, CALLBACK_KEY, offload_bypass)


def offload_bypass(patcher, unpatch_all: bool = True) -> None:
    """ON_DETACH: the detached patcher's bypass adapters leave its compute device (see
    ``FusedBypassManager.offload``)."""
    manager = (getattr(patcher, "attachments", None) or {}).get(MANAGER_ATTACHMENT)
    if manager is not None:
        manager.offload(patcher, unpatch_all)


def _decide(tensors: Dict[str, torch.Tensor], modules: Dict[str, torch.nn.Module], slot: AdapterSlot) -> AdapterSlot:
    tensor = tensors.get(slot.target.weight_key)
    if tensor is None:  # an earlier slot whose weight this model does not have: the manager says so
        return slot
    return decided(slot, _owner(modules, slot.target, tensor), logical_shape(tensor))


def _nonfinite(pairs: List[Tuple[Any, Any]]) -> List[Any]:
    """The keys of the ``(key, adapter)`` pairs with NaN or inf in their factors.

    One sum per distinct factor, the sums checked at once: a sum is finite only when
    every element is (NaN and inf carry through); a non-finite one (that, or finite values
    that overflow) sends every adapter to the exact per-factor check. A check per factor was
    most of a plain LoRA's load time."""
    tensors = {}
    for _, adapter in pairs:
        for tensor in _factors(adapter):
            tensors[id(tensor)] = tensor
    sums: Dict[torch.device, list] = {}  # stacked per device
    for t in tensors.values():
        sums.setdefault(t.device, []).append(t.sum() if t.element_size() > 1 else t.to(torch.float32).sum())
    if all(bool(torch.isfinite(torch.stack(on_device)).all()) for on_device in sums.values()):
        return []
    return [key for key, adapter in pairs if not _finite(adapter)]


def _factors(adapter):
    """The floating-point factors with values (a meta tensor, in a dry run, has none)."""
    weights = getattr(adapter, "weights", None) or ()
    return [w for w in weights if isinstance(w, torch.Tensor) and w.is_floating_point()
            and w.device.type != "meta" and w.numel() > 0]


def _finite(adapter) -> bool:
    """No NaN or inf in the factors: their min and max (``aminmax`` carries NaN and inf through).
    ``isfinite(...).all()`` on bf16 factors was half of a load's time; fp8 has no kernel for
    either, so it is upcast."""
    return all(_finite_tensor(w) for w in _factors(adapter))


def _finite_tensor(tensor: torch.Tensor) -> bool:
    lo, hi = torch.aminmax(tensor if tensor.element_size() > 1 else tensor.to(torch.float32))
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


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
    report = LoadReport()

    new_model = None
    if model is not None:
        new_model = model.clone()
        if regular:
            applied.update(new_model.add_patches(regular, strength_model))
        applied |= bypass_into(new_model, new_model.model, adapters, strength_model, report)

    new_clip = None
    if clip is not None:
        new_clip = clip.clone()
        if regular:
            applied.update(new_clip.add_patches(regular, strength_clip))
        applied |= bypass_into(new_clip.patcher, new_clip.cond_stage_model, adapters, strength_clip, report)

    _log_report(len(lora), loaded, adapters, applied, report)
    for patcher in (new_model, getattr(new_clip, "patcher", None)):
        if patcher is not None:  # what this load decided, for check --lora and other tools
            patcher.set_attachments(REPORT_ATTACHMENT, report)
    return new_model, new_clip


def _log_report(n_tensors, loaded, adapters, applied, report: LoadReport) -> None:
    """Each malformed or misfit key at ERROR; then one summary line with every adapter's fate:
    INFO when everything applied, WARNING naming what did not (and why, for an adapter whose
    weight cannot be read)."""
    for err in report.errors:
        log.error("[freefuse_bypass_patch] %s; adapter skipped", err)
    refusals = [d for d in report.decisions.values() if d.fate == REFUSED]
    for decision in refusals:
        if not decision.unreadable:
            log.error("[freefuse_bypass_patch] %s; adapter skipped", decision.reason)
    unreadable = [d.reason for d in refusals if d.unreadable]  # this model's storage: said once, below
    why = "; refused: %s" % "; ".join(unreadable) if unreadable else ""
    if not applied:
        if refusals:
            log.warning("[freefuse_bypass_patch] bypass LoRA: nothing applied%s", why)
        elif n_tensors:
            log.warning("[freefuse_bypass_patch] bypass LoRA: 0 of %d keys matched this model "
                        "(a LoRA for another architecture?)", n_tensors)
        else:
            log.warning("[freefuse_bypass_patch] bypass LoRA is empty: nothing to apply")
        return
    bypassed = [k for k in adapters if k in applied and report.decisions[k].fate != MERGED]
    fused = sum(1 for k in bypassed if isinstance(k, tuple) and len(k) > 1 and k[1] is not None)
    funcs = sum(1 for k in bypassed if isinstance(k, tuple) and len(k) > 2)
    missing = [k for k in loaded if k not in applied]
    line = ("[freefuse_bypass_patch] bypass LoRA: %d adapters in bypass (%d on fused slices, "
            "%d with a diff function), %d regular patches; %s" % (
                len(bypassed), fused, funcs, len(applied) - len(bypassed), _fates(report)))
    if missing:
        log.warning("%s; NOT applied (%d): %s%s", line, len(missing), ", ".join(map(str, missing)), why)
    else:
        log.info(line)


def _fates(report: LoadReport) -> str:
    """``48 factored, 1 transient (key: why), 1 merged (key: why)``: each adapter's fate."""
    counts = report.counts()
    parts = ["%d factored" % counts.get(FACTORED, 0)]
    for fate in (TRANSIENT, MERGED):
        named = ["%s: %s" % (_short(k), d.reason) for k, d in report.decisions.items() if d.fate == fate]
        if named:
            parts.append("%d %s (%s)" % (len(named), fate, "; ".join(named)))
    return ", ".join(parts)


def _short(key) -> str:
    """A load_lora key as the summary names it: the weight, and its slice or function."""
    try:
        return parse_target(key).describe().replace("diffusion_model.", "", 1)
    except BypassKeyError:
        return str(key)
