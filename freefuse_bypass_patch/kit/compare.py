"""Running a model the way ComfyUI does and comparing bypass with merged.

The reference is always ComfyUI's own merged path (``load_lora_for_models``); bypass goes
through whatever ``comfy.sd`` holds now (stock or patched), or through the plugin's manager
directly on ComfyUI versions that have no bypass loader.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Dict, Iterable, List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .models import flux_inputs, tiny_flux


def forward(patcher, inputs) -> torch.Tensor:
    """Load ``patcher`` the way ComfyUI does, run the diffusion model once, unload everything."""
    import comfy.model_management as mm

    mm.load_models_gpu([patcher])
    try:
        return apply_model(patcher, inputs).clone()
    finally:
        mm.unload_all_models()


def apply_model(patcher, inputs) -> torch.Tensor:
    """One run of ``patcher``'s diffusion model on ``inputs`` (``x``, ``t`` and the keyword
    arguments, see ``models.tiny_inputs``), without autograd. Loading it (and unloading) is the
    caller's: ``forward`` does both; tests and benchmarks that load once run this in a loop."""
    with torch.no_grad():
        rest = {k: v for k, v in inputs.items() if k not in ("x", "t")}
        return patcher.model.apply_model(inputs["x"], inputs["t"], **rest)


def manager_bypass(base, loras: Iterable[Tuple[Dict[str, torch.Tensor], float]], layout: str = "auto"):
    """A clone of ``base`` with the plugin's manager applied directly to load_lora's output.

    No bypass loader needed, so this works on ComfyUI versions that predate bypass mode.
    Returns (patcher, manager); the LoRAs are applied in order, as a chain would.
    """
    import comfy.lora
    import comfy.lora_convert

    from ..manager import FusedBypassManager

    key_map = comfy.lora.model_lora_keys_unet(base.model, {})
    manager = FusedBypassManager(layout=layout)
    for lora, strength in loras:
        for key, adapter in comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(lora)), key_map).items():
            manager.add_adapter(key, adapter, strength)
    patcher = base.clone()
    patcher.set_injections("bypass_lora", manager.create_injections(patcher.model))
    return patcher, manager


def with_layout(patcher, layout: str):
    """A clone of a patcher loaded in bypass mode whose hooks use ``layout`` for their grouped
    up-projections (``hooks.LAYOUTS``): the loader always uses "auto"."""
    from ..loader import INJECTION_KEY, SLOTS_ATTACHMENT
    from ..manager import FusedBypassManager

    clone = patcher.clone()
    slots = clone.attachments[SLOTS_ATTACHMENT]
    clone.set_injections(INJECTION_KEY, FusedBypassManager(slots, layout=layout).create_injections(clone.model))
    return clone


class LogCapture(logging.Handler):
    """Collects log records (root logger) while active."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records: List[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def count(self, text: str) -> int:
        return sum(1 for r in self.records if text in r.getMessage())

    def __enter__(self):
        root = logging.getLogger()
        self._level = root.level
        root.setLevel(min(root.level or logging.WARNING, logging.INFO))
        root.addHandler(self)
        return self

    def __exit__(self, *exc):
        root = logging.getLogger()
        root.removeHandler(self)
        root.setLevel(self._level)


def weights_snapshot(patcher) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in patcher.model.state_dict().items()}


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def chain(load, patcher, loras: Iterable[Tuple[Dict[str, torch.Tensor], float]]):
    for sd, strength in loras:
        patcher = load(patcher, None, sd, strength, 0)[0]
    return patcher


def compare(loras: List[Tuple[Dict[str, torch.Tensor], float]], seed: int = 0, build=None, inputs=None) -> dict:
    """Bypass vs merged for a chain of LoRAs, with whatever loader comfy.sd has now.

    ``build()`` makes the model (default: a tiny Flux) and ``inputs`` feeds ``forward``.
    """
    import comfy.sd

    base = build() if build is not None else tiny_flux(seed)
    inputs = inputs if inputs is not None else flux_inputs()
    before = weights_snapshot(base)
    base_out = forward(base, inputs)
    merged_out = forward(chain(comfy.sd.load_lora_for_models, base, loras), inputs)
    with LogCapture() as logs:
        bypass = chain(comfy.sd.load_bypass_lora_for_models, base, loras)
        bypass_out = forward(bypass, inputs)
    after_out = forward(base, inputs)
    after = weights_snapshot(base)
    return dict(
        dropped=logs.count("not in model state_dict"),
        rel_diff=max_rel_diff(bypass_out, merged_out),
        abs_diff=float((bypass_out - merged_out).abs().max()),
        lora_effect=max_rel_diff(merged_out, base_out),
        bypass_effect=max_rel_diff(bypass_out, base_out),
        weights_unchanged=all(torch.equal(before[k], after[k]) for k in before),
        base_restored=torch.equal(after_out, base_out),
    )


def direct_hook_vs_merged(lora, build, inputs) -> float:
    """hooks.py on real load_lora output, for ComfyUI versions that have no bypass loader."""
    import comfy.sd

    base = build()
    patcher, _ = manager_bypass(base, [(lora, 1.0)])
    merged = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0)[0]
    return max_rel_diff(forward(patcher, inputs), forward(merged, inputs))


def time_interleaved(modes: Dict[str, object], inputs, rounds: int, iters: int) -> Dict[str, List[float]]:
    """Seconds per forward of each mode's patcher: ``rounds`` passes over the modes in a shuffled
    order (seeded), each loading its patcher, one warm-up forward (the plugin builds its forms
    there), ``iters`` timed ones, then unloading, so a shared machine's drift falls on every mode
    alike. The caller chooses the grad mode around it."""
    import comfy.model_management as mm

    times: Dict[str, List[float]] = {name: [] for name in modes}
    order, rng = list(modes), random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            mm.load_models_gpu([modes[name]])
            apply_model(modes[name], inputs)
            for _ in range(iters):
                start = time.perf_counter()
                apply_model(modes[name], inputs)
                times[name].append(time.perf_counter() - start)
            mm.unload_all_models()
    return times


class LargestNewCpuTensor(TorchDispatchMode):
    """Bytes of the largest CPU tensor with a storage of its own created under it (views of existing
    storage do not count): what a load allocates, without timing or RSS noise."""

    def __init__(self):
        super().__init__()
        self.largest, self.what = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type == "cpu"}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.untyped_storage().data_ptr() not in inputs:
                size = t.untyped_storage().nbytes()
                if size > self.largest:
                    self.largest, self.what = size, "%s -> %s" % (func, tuple(t.shape))
        return out
