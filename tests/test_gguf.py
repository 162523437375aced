"""Bypass on ComfyUI-GGUF models: a tiny Flux written as GGUF (Q8_0 and Q4_K block weights),
loaded by city96's node with its own ``UnetLoaderGGUF``, every adapter type through the stock
loader with the plugin installed.

Two references: ComfyUI-GGUF's own merged path (its patches applied at dequantization) and an
fp32 model holding the node's own dequantization of every weight, with the LoRA merged by
ComfyUI. Both see exactly the weights the GGUF forward computes with, so bypass may differ
from them by fp32 rounding only (REL_TOL, measured <= 1.1e-6). After eject every GGMLTensor
is unchanged and the base output is bitwise the same.

ComfyUI-GGUF comes from ../shared/custom_nodes/ComfyUI-GGUF (or $COMFYUI_GGUF_PATH); with
CI=true a missing copy fails the suite instead of skipping it. It does not load on the 0.12.1
fork (that fork's folder_paths rejects an argument the node passes):
test_gguf_node_does_not_load_on_the_fork checks that, and that the plugin is unaffected.
"""

import os
import tempfile

import pytest
import torch

import comfy
import comfy.sd

from freefuse_bypass_patch import kit as sc
from support import REL_TOL, bypass_era

pytestmark = bypass_era
gguf_kit = pytest.importorskip("freefuse_bypass_patch.kit.gguf")

FORK = os.path.isdir(os.path.join(list(comfy.__path__)[0], "cmd"))  # the pip-installable fork
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
NOT_APPLIED = ("NOT applied", "adapter skipped", "refused", "does not fit", "not applied")


def _source():
    source = gguf_kit.node_source()
    if source is None:
        message = "ComfyUI-GGUF not found (set %s or put it in ../shared/custom_nodes)" % gguf_kit.NODE_ENV
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return source


@pytest.fixture(scope="module")
def node():
    if FORK:
        pytest.skip("ComfyUI-GGUF does not load on the 0.12.1 fork (see test_gguf_node_does_not_load_on_the_fork)")
    return gguf_kit.load_node(_source())


@pytest.fixture(scope="module")
def models(node):
    """(GGUF patcher, fp32 reference patcher, {key: GGUF type}, inputs)."""
    quantized, reference, kinds = gguf_kit.gguf_flux(node, tempfile.mkdtemp(prefix="ffbp_gguf_model_"))
    assert {"Q8_0", "Q4_K"} <= set(kinds.values())
    return quantized, reference, kinds, sc.flux_inputs(config=gguf_kit.GGUF_FLUX)


def _gguf_state(patcher, node):
    """Every GGMLTensor of the model: type, quant type, logical shape, raw bytes, patches."""
    state = {}
    for name, tensor in patcher.model.named_parameters():
        if node.is_gguf(tensor):
            state[name] = (type(tensor), tensor.tensor_type, tuple(tensor.shape),
                           tensor.as_subclass(torch.Tensor).clone(), list(getattr(tensor, "patches", [])))
    return state


def _same_state(before, after):
    assert before.keys() == after.keys()
    for name, (kind, qtype, shape, data, patches) in before.items():
        kind2, qtype2, shape2, data2, patches2 = after[name]
        assert (kind, qtype, shape, patches) == (kind2, qtype2, shape2, patches2), name
        assert torch.equal(data, data2), name


def _loras(reference, case):
    """(LoRA, strength) chain for ``case``, factors sized from the fp32 model's weights."""
    model = reference.model
    if case == "kohya":
        return [(sc.make_lora(model, "kohya", rank=4, seed=61, alpha=4), 1.0)]
    if case == "diffusers":  # fused q/k/v (and linear1 slices): what stock bypass drops
        return [(sc.make_lora(model, "diffusers", rank=4, seed=62, alpha=4), 0.9)]
    if case == "lora+dora":
        return [(sc.make_lora(model, "diffusers", rank=4, seed=63, alpha=4), 0.8),
                (sc.adapter_lora(model, "dora", "kohya", seed=64, limit=100), 0.7)]
    return [(sc.adapter_lora(model, case, "kohya", seed=65, limit=100), 0.8)]


CASES = ["kohya", "diffusers", "loha", "lokr", "dora", "dora_in", "glora", "oft", "boft", "lora+dora"]


@pytest.mark.parametrize("case", CASES)
def test_every_adapter_type_on_gguf_equals_merged(models, node, case):
    quantized, reference, _, inputs = models
    loras = _loras(reference, case)
    base_out = sc.forward(quantized, inputs)
    before = _gguf_state(quantized, node)

    expected = sc.forward(sc.chain(comfy.sd.load_lora_for_models, reference, loras), inputs)
    gguf_merged = sc.forward(sc.chain(comfy.sd.load_lora_for_models, quantized, loras), inputs)
    with sc.LogCapture() as logs:
        patched = sc.chain(comfy.sd.load_bypass_lora_for_models, quantized, loras)
        got = sc.forward(patched, inputs)
    messages = [r.getMessage() for r in logs.records]
    assert not [m for m in messages if any(s in m for s in NOT_APPLIED)], messages

    assert sc.max_rel_diff(expected, base_out) > 0.05  # the LoRA really changes the output
    assert sc.max_rel_diff(gguf_merged, expected) <= REL_TOL  # the two references agree
    assert sc.max_rel_diff(got, gguf_merged) <= REL_TOL, case
    assert sc.max_rel_diff(got, expected) <= REL_TOL, case

    _same_state(before, _gguf_state(quantized, node))
    _same_state(before, _gguf_state(patched, node))  # the bypass clone shares the weights, untouched
    assert torch.equal(sc.forward(quantized, inputs), base_out)


@pytest.mark.parametrize("kind", ["dora", "oft"])
def test_merged_lora_after_a_bypass_reader_on_gguf(models, node, kind):
    """Issue 20: a merged LoRA after a bypass DoRA/OFT is one of the node's own patches, applied at
    dequantization; the replay undoes it from what the node's cast gives. == the same graph merged."""
    quantized, reference, _, inputs = models
    reader = sc.adapter_lora(reference.model, kind, "kohya", seed=66, limit=100)
    lora = sc.make_lora(reference.model, "kohya", rank=4, seed=67, alpha=4)
    before = _gguf_state(quantized, node)

    def graph(base, first):
        return comfy.sd.load_lora_for_models(first(base, None, reader, 0.8, 0)[0], None, lora, 1.0, 0)[0]

    expected = sc.forward(graph(reference, comfy.sd.load_lora_for_models), inputs)
    got = sc.forward(graph(quantized, comfy.sd.load_bypass_lora_for_models), inputs)
    assert sc.max_rel_diff(got, expected) <= REL_TOL, kind
    _same_state(before, _gguf_state(quantized, node))


def test_gguf_weights_read_through_the_node(models, node):
    """What the plugin reads of a GGUF weight: the logical shape (not the state dict's block
    shape) and the node's own dequantization (not torch's dequantize() of the raw bytes)."""
    from freefuse_bypass_patch.weights import logical_shape, read

    quantized, reference, kinds, _ = models
    module = quantized.model.diffusion_model.double_blocks[1].img_attn.qkv
    assert kinds["double_blocks.1.img_attn.qkv.weight"] == "Q4_K"
    fake = quantized.model.diffusion_model.state_dict()["double_blocks.1.img_attn.qkv.weight"]
    assert tuple(fake.shape) != logical_shape(module.weight) == (768, 256)
    weight, bias = read(module, torch.device("cpu"), torch.float32)
    expected = reference.model.diffusion_model.double_blocks[1].img_attn.qkv
    assert torch.equal(weight, expected.weight) and torch.equal(bias, expected.bias)


def test_q4_k_writer_matches_the_gguf_package():
    """The tests' Q4_K blocks decode, by the gguf package's reference dequantizer, to values within
    half a quantization step of the input (and each block is the 144 bytes the format has)."""
    import gguf
    import numpy as np

    gen = np.random.default_rng(7)
    x = (gen.standard_normal((6, 512)) * np.linspace(0.01, 2, 512)).astype(np.float32)
    blocks = gguf_kit.quantize_q4_k(x)
    assert blocks.shape == (6, 2 * 144) and blocks.dtype == np.uint8
    decoded = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_K)
    assert decoded.shape == x.shape
    # per sub-block: the step (range / 15) and the min; per 256 super-block their 6-bit units
    sub = x.reshape(-1, 8, 32)
    low = np.minimum(sub.min(-1), 0)
    step, mins = (sub.max(-1) - low) / 15, -low
    d, dmin = step.max(-1, keepdims=True) / 63, mins.max(-1, keepdims=True) / 63
    # rounding to the grid: half a step; the 6-bit step and min may each be off by half a unit,
    # which moves the grid by up to 15 * d / 2 + dmin / 2 (fp16 rounding of d and dmin: ~1e-3 more)
    bound = (0.5 * step + 8 * d + 0.5 * dmin) * 1.01
    assert (np.abs(decoded - x).reshape(-1, 8, 32) <= bound[..., None]).all()
    assert np.abs(decoded - x).max() > 0  # it really quantized


@pytest.mark.skipif(not FORK, reason="only the 0.12.1 fork fails to load ComfyUI-GGUF")
def test_gguf_node_does_not_load_on_the_fork():
    """On the pip-installable fork ComfyUI-GGUF fails in its own import (the fork's folder_paths
    rejects ``get(key, default)``); the plugin stays patched and bypass still equals merged."""
    from freefuse_bypass_patch import is_patched

    with pytest.raises(RuntimeError, match="did not load ComfyUI-GGUF"):
        gguf_kit.load_node(_source())
    assert is_patched()
    report = sc.compare([(sc.make_lora(sc.tiny_flux().model, "diffusers", rank=4, seed=66, alpha=4), 1.0)])
    assert report["dropped"] == 0 and report["rel_diff"] <= REL_TOL, report
