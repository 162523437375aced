"""200 cycles of: load 3 chained bypass LoRAs -> forward -> unload -> forward, on one model.

After every unload no hook or adapter is left on any module and the base output is
bit-exact; hooks, patchers, injections and tensors do not grow (bounds below: zero)."""

import gc
import logging

import comfy.sd
import torch

from freefuse_bypass_patch import kit as sc
from freefuse_bypass_patch.hooks import ACTIVE_HOOK_ATTR
from support import REL_TOL, bypass_era

pytestmark = bypass_era

CYCLES = 200
# Growth allowed between cycle 20 and the end, per kind of object that a leak of ours would
# leave behind. (A count of all Python objects is not used: the 0.12.1 fork runs telemetry
# threads whose objects come and go on their own.)
BOUNDS = {"hooks": 0, "patchers": 0, "injections": 0, "tensors": 0}


def _counts():
    import comfy.model_patcher
    import comfy.patcher_extension

    from freefuse_bypass_patch.hooks import FusedBypassHook

    gc.collect()
    kinds = {"hooks": FusedBypassHook, "patchers": comfy.model_patcher.ModelPatcher,
             "injections": comfy.patcher_extension.PatcherInjection}
    counts = dict.fromkeys(BOUNDS, 0)
    for obj in gc.get_objects():
        kind = type(obj)  # type(), not isinstance(): some torch objects warn when probed
        if kind in (torch.Tensor, torch.nn.Parameter):
            counts["tensors"] += 1
        else:
            for name, cls in kinds.items():
                if issubclass(kind, cls):
                    counts[name] += 1
    return counts


def test_soak_load_forward_unload():
    base = sc.tiny_flux()
    inputs = sc.flux_inputs()
    loras = [(sc.make_lora(base.model, conv, rank=4, seed=s), st)
             for conv, s, st in (("diffusers", 41, 0.8), ("diffusers", 42, 0.5), ("kohya", 43, 1.0))]
    base_out = sc.forward(base, inputs)
    merged_out = sc.forward(sc.chain(comfy.sd.load_lora_for_models, base, loras), inputs)
    logging.disable(logging.INFO)  # log capture would keep every INFO record: not ours to count
    try:
        _cycles(base, inputs, loras, base_out, merged_out)
    finally:
        logging.disable(logging.NOTSET)


def _cycles(base, inputs, loras, base_out, merged_out):
    start = None
    for cycle in range(CYCLES):
        patcher = sc.chain(comfy.sd.load_bypass_lora_for_models, base, loras)
        out = sc.forward(patcher, inputs)  # loads, runs, unloads everything
        del patcher
        assert sc.max_rel_diff(out, merged_out) <= REL_TOL, cycle
        assert not any(ACTIVE_HOOK_ATTR in m.__dict__ or m._forward_hooks for m in base.model.modules()), cycle
        assert torch.equal(sc.forward(base, inputs), base_out), cycle
        if cycle == 19:
            start = _counts()
    end = _counts()
    print("after cycle 20: %s; after cycle %d: %s" % (start, CYCLES, end))
    assert all(end[k] - start[k] <= bound for k, bound in BOUNDS.items()), (start, end)
