"""Diff functions that only permute rows (ComfyUI's ``swap_scale_shift``) get a factored form.

Flux LoRAs from diffusers and ai-toolkit carry ``norm_out.linear``, which ComfyUI maps to
``final_layer.adaLN_modulation.1`` through ``swap_scale_shift`` (SD3: the last context block's
modulation likewise). A fixed row permutation of the diff is a permutation of the up-projection's
rows (or of the term's rows): factors only, no merge code in the forward (issue 20).
"""

import comfy.lora
import comfy.sd
import pytest
import torch

from freefuse_bypass_patch import kit as sc
from freefuse_bypass_patch.forms import row_permutation
from freefuse_bypass_patch.loader import REPORT_ATTACHMENT
from freefuse_bypass_patch.slots import FACTORED, TRANSIENT
from support import REL_TOL, bypass_era

pytestmark = bypass_era

KINDS = {"lora": FACTORED, "loha": FACTORED, "lokr": FACTORED, "dora": TRANSIENT}  # DoRA: merged applies
# the function inside weight_decompose, to the diff before the row norms: it stays a transient delta


def _function_targets(model):
    return [t for t in sc.named_targets(model, "transformer.") if isinstance(t[1], tuple) and len(t[1]) > 2]


def test_row_permutation_reads_swap_scale_shift_and_nothing_else():
    from comfy.lora import model_lora_keys_unet

    flux = sc.tiny_flux()
    fn = next(v[2] for v in model_lora_keys_unet(flux.model, {}).values() if isinstance(v, tuple) and len(v) > 2)
    assert fn.__name__ == "swap_scale_shift"
    assert row_permutation(fn, 6) == (3, 4, 5, 0, 1, 2)
    assert row_permutation(lambda d: d * 2, 6) is None
    assert row_permutation(lambda d: d.flip(1), 6) is None
    assert row_permutation(lambda d: d[:3], 6) is None
    assert row_permutation(lambda d: 1 / 0, 6) is None


class _MergeCodeCalls:
    def __enter__(self):
        self.calls, self._real = 0, comfy.lora.calculate_weight

        def counting(*args, **kwargs):
            self.calls += 1
            return self._real(*args, **kwargs)

        comfy.lora.calculate_weight = counting
        return self

    def __exit__(self, *exc):
        comfy.lora.calculate_weight = self._real


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_swap_scale_shift_is_factored_and_equals_merged(family, kind):
    if not sc.available(family):
        pytest.skip("this ComfyUI cannot build %s" % family)
    base = sc.tiny_model(family)
    inputs = sc.tiny_inputs(family)
    targets = _function_targets(base.model)
    assert targets, "the key map of %s has no diff function" % family
    lora = sc.adapter_lora(base.model, kind, targets=targets, seed=5)
    bypass = comfy.sd.load_bypass_lora_for_models(base, None, lora, 0.8, 0)[0]
    report = bypass.attachments[REPORT_ATTACHMENT]
    functions = {k: d for k, d in report.decisions.items() if isinstance(k, tuple) and len(k) > 2}
    assert functions and {d.fate for d in functions.values()} == {KINDS[kind]}, functions
    merged = sc.forward(comfy.sd.load_lora_for_models(base, None, lora, 0.8, 0)[0], inputs)
    plain = sc.forward(base, inputs)
    assert sc.max_rel_diff(merged, plain) > 1e-4  # the adapter changes the output
    import comfy.model_management as mm

    mm.load_models_gpu([bypass])
    try:
        with _MergeCodeCalls() as merge_code:
            out = sc.apply_model(bypass, inputs)
    finally:
        mm.unload_all_models()
    assert sc.max_rel_diff(out, merged) <= REL_TOL
    if KINDS[kind] == FACTORED:
        assert merge_code.calls == 0  # no merge code, no full-size delta in the forward
