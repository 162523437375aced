"""200 cycles of: load 3 chained bypass LoRAs -> forward -> unload -> forward, on one model.

After every unload no hook or adapter is left on any module and the base output is
bit-exact; Python objects and tensors stay bounded (bound stated below, measured ~0)."""

import gc

import comfy.sd
import torch

from freefuse_bypass_patch import selfcheck as sc
from freefuse_bypass_patch.hooks import ACTIVE_HOOK_ATTR
from support import REL_TOL, bypass_era

pytestmark = bypass_era

CYCLES = 200
# Growth allowed between cycle 20 and the end: ComfyUI and torch keep small caches of
# their own; a leak of our hooks/slots would add hundreds of objects per cycle.
OBJECT_BOUND = 2000
TENSOR_BOUND = 0


def _counts():
    gc.collect()
    objects = gc.get_objects()
    return len(objects), sum(1 for o in objects if type(o) in (torch.Tensor, torch.nn.Parameter))


def test_soak_load_forward_unload():
    base = sc.tiny_flux()
    inputs = sc.flux_inputs()
    loras = [(sc.make_lora(base.model, conv, rank=4, seed=s), st)
             for conv, s, st in (("diffusers", 41, 0.8), ("diffusers", 42, 0.5), ("kohya", 43, 1.0))]
    base_out = sc.forward(base, inputs)
    merged_out = sc.forward(sc.chain(comfy.sd.load_lora_for_models, base, loras), inputs)
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
    print("objects, tensors after cycle 20: %s; after cycle %d: %s" % (start, CYCLES, end))
    assert end[0] - start[0] <= OBJECT_BOUND, (start, end)
    assert end[1] - start[1] <= TENSOR_BOUND, (start, end)
