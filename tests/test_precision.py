"""Non-float weight storage: plain fp8 (float8_e4m3fn, as ComfyUI loads fp8 checkpoints) and
ComfyUI's QuantizedTensor (scaled fp8, int8): the adapter math must not run in the storage
dtype. Reference: an fp32 model holding the dequantised weights, with the LoRA merged in fp32."""

import logging

import pytest
import torch

import comfy.sd

from freefuse_bypass_patch import kit as sc
from support import REL_TOL, bypass_era

pytestmark = bypass_era


@pytest.mark.parametrize("kind", ["diffusers-lora", "kohya-dora"])
def test_fp8_weights_match_fp32_reference(kind):
    fp8 = sc.tiny_flux(dtype=torch.float8_e4m3fn, manual_cast=torch.float32)
    assert fp8.model.diffusion_model.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    reference = sc.tiny_flux()
    with torch.no_grad():
        state = {k: v.to(torch.float32) for k, v in fp8.model.diffusion_model.state_dict().items()}
        reference.model.diffusion_model.load_state_dict(state)
    inputs = sc.flux_inputs()
    if kind == "diffusers-lora":
        lora = sc.make_lora(reference.model, "diffusers", rank=4, seed=31, alpha=4)
    else:
        lora = sc.adapter_lora(reference.model, "dora", "kohya", seed=32, limit=12)
    before = sc.weights_snapshot(fp8)
    expected = sc.forward(comfy.sd.load_lora_for_models(reference, None, lora, 1.0, 0)[0], inputs)
    got = sc.forward(comfy.sd.load_bypass_lora_for_models(fp8, None, lora, 1.0, 0)[0], inputs)
    assert sc.max_rel_diff(expected, sc.forward(reference, inputs)) > 10 * REL_TOL
    assert sc.max_rel_diff(got, expected) <= REL_TOL
    after = sc.weights_snapshot(fp8)
    assert all(torch.equal(before[k].view(torch.uint8), after[k].view(torch.uint8))
               if before[k].dtype == torch.float8_e4m3fn else torch.equal(before[k], after[k]) for k in before)


def _quantized_flux(fmt):
    """A tiny Flux whose attention/MLP weights ComfyUI holds as QuantizedTensor (``fmt``),
    loaded through ComfyUI's mixed-precision ops from a state dict with ``comfy_quant``
    metadata, and an fp32 reference holding ComfyUI's own dequantisation of those weights."""
    import json

    import comfy.model_patcher
    import comfy.supported_models

    from freefuse_bypass_patch.weights import read

    reference = sc.tiny_flux()
    state = {}
    for key, value in reference.model.diffusion_model.state_dict().items():
        state[key] = value
        if value.dim() == 2 and any(n in key for n in ("qkv", "linear1", "proj", "mlp")):
            prefix = key[: -len("weight")]
            if fmt == "int8_tensorwise":
                scale = value.abs().max() / 127
                state[key] = (value / scale).round().clamp(-127, 127).to(torch.int8)
            else:
                scale = value.abs().max() / 448
                state[key] = (value / scale).to(torch.float8_e4m3fn)
            state[prefix + "weight_scale"] = scale.reshape(()).float()
            conf = {"format": fmt, "full_precision_matrix_mult": True}
            state[prefix + "comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
    config = comfy.supported_models.Flux(dict(reference.model.model_config.unet_config))
    config.quant_config = {"mixed_ops": True}
    config.set_inference_dtype(torch.float32, torch.float32)
    model = config.get_model({}, device=torch.device("cpu"))
    model.load_model_weights(state, "")
    cpu = torch.device("cpu")
    quantized = {name + ".weight": read(m, cpu, torch.float32)[0] for name, m in model.diffusion_model.named_modules()
                 if type(getattr(m, "weight", None)).__name__ == "QuantizedTensor"}
    assert len(quantized) > 10, "ComfyUI did not load quantized weights"
    with torch.no_grad():
        reference.model.diffusion_model.load_state_dict(quantized, strict=False)
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu), reference


def _quant_formats():
    import comfy.quant_ops

    return [f for f in ("float8_e4m3fn", "int8_tensorwise") if f in getattr(comfy.quant_ops, "QUANT_ALGOS", {})]


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "int8_tensorwise"])
def test_quantized_tensor_weights(fmt, caplog):
    """Weights held as ComfyUI QuantizedTensor: plain LoRA never reads them; DoRA's row norms
    read W' through the module's cast path (weights.py), dequantised (a QuantizedTensor's
    .to(float32) stays quantized)."""
    if fmt not in _quant_formats():
        pytest.skip("this ComfyUI has no %s QuantizedTensor storage" % fmt)
    quantized, reference = _quantized_flux(fmt)
    inputs = sc.flux_inputs()
    base_error = sc.max_rel_diff(sc.forward(quantized, inputs), sc.forward(reference, inputs))
    for lora in (sc.make_lora(reference.model, "diffusers", rank=4, seed=33, alpha=4),
                 sc.adapter_lora(reference.model, "dora", "kohya", seed=34, limit=12)):
        expected = sc.forward(comfy.sd.load_lora_for_models(reference, None, lora, 1.0, 0)[0], inputs)
        comfy_merged = sc.forward(comfy.sd.load_lora_for_models(quantized, None, lora, 1.0, 0)[0], inputs)
        with caplog.at_level(logging.ERROR):
            got = sc.forward(comfy.sd.load_bypass_lora_for_models(quantized, None, lora, 1.0, 0)[0], inputs)
        assert "Cannot copy" not in caplog.text
        error = sc.max_rel_diff(got, expected)
        if base_error <= 1e-6:  # the tree computes this format exactly (fp8 with full-precision mm)
            assert error <= REL_TOL, (fmt, error)
        else:  # the tree's own quantized matmul rounds: bypass must still beat merging into it
            assert error < sc.max_rel_diff(comfy_merged, expected), (fmt, error, base_error)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("kind", ["diffusers-lora", "dora", "loha", "lokr", "glora"])
def test_fp8_lora_factors(dtype, kind):
    """LoRA files with fp8 factors load as they are (comfy.utils.load_torch_file keeps the dtype);
    merged upcasts them in calculate_weight, so must bypass (torch has no isfinite for fp8)."""
    base = sc.tiny_flux()
    if kind == "diffusers-lora":
        lora = sc.make_lora(base.model, "diffusers", rank=4, seed=35, alpha=4)
    else:
        lora = sc.adapter_lora(base.model, kind, "kohya", seed=36, limit=12)
    lora = {k: v if v.dim() == 0 else v.to(dtype) for k, v in lora.items()}  # alpha stays a float scalar
    report = sc.compare([(lora, 0.9)], build=lambda: base)
    # an effect 10x the tolerance: an adapter left out would fail the comparison
    assert report["dropped"] == 0 and report["lora_effect"] > 10 * REL_TOL, report
    assert report["rel_diff"] <= REL_TOL, report


class _Opaque(torch.Tensor):
    """A weight type this plugin has never seen, on a module with no cast path (a third-party op)."""


def _opaque_flux():
    """A tiny Flux whose double_blocks.0.img_attn.proj is a plain torch Linear holding an _Opaque weight."""
    base = sc.tiny_flux()
    block = base.model.diffusion_model.double_blocks[0].img_attn
    plain = torch.nn.Linear(block.proj.in_features, block.proj.out_features)
    with torch.no_grad():
        plain.weight = torch.nn.Parameter(block.proj.weight.detach().clone().as_subclass(_Opaque), requires_grad=False)
        plain.bias = torch.nn.Parameter(block.proj.bias.detach().clone(), requires_grad=False)
    block.proj = plain
    return base


@pytest.mark.parametrize("kind", ["lora", "lokr", "loha", "oft", "boft"])
def test_unreadable_weight_keeps_adapters_that_never_read_it(kind):
    base = _opaque_flux()
    gen = torch.Generator().manual_seed(37)
    rows, cols = base.model.diffusion_model.double_blocks[0].img_attn.proj.weight.shape
    lora = {"lora_unet_double_blocks_0_img_attn_proj.%s" % k: v
            for k, v in sc.adapter_factors(kind, rows, cols, gen).items()}
    report = sc.compare([(lora, 0.9)], build=lambda: base)
    # one module of the model: an effect 10x the tolerance, so an adapter left out fails the comparison
    assert report["dropped"] == 0 and report["lora_effect"] > 10 * REL_TOL, report
    assert report["rel_diff"] <= REL_TOL, report


@pytest.mark.parametrize("kind", ["dora", "glora"])
def test_unreadable_weight_refuses_readers_at_load(kind):
    """DoRA and GLoRA need W' of a weight nothing can read: refused at load with one WARNING that
    names the key and the weight's type; the rest of the LoRA loads; no forward raises or logs."""
    base = _opaque_flux()
    inputs = sc.flux_inputs()
    gen = torch.Generator().manual_seed(38)
    rows, cols = base.model.diffusion_model.double_blocks[0].img_attn.proj.weight.shape
    reader = {"lora_unet_double_blocks_0_img_attn_proj.%s" % k: v
              for k, v in sc.adapter_factors(kind, rows, cols, gen).items()}
    other = sc.make_lora(base.model, "kohya", rank=4, seed=39, include=lambda key: "img_attn.qkv" in key)
    expected = sc.forward(comfy.sd.load_lora_for_models(base, None, other, 1.0, 0)[0], inputs)
    with sc.LogCapture() as logs:
        patched = comfy.sd.load_bypass_lora_for_models(base, None, dict(other, **reader), 1.0, 0)[0]
    warnings = [r.getMessage() for r in logs.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "refused" in warnings[0], warnings
    assert "double_blocks.0.img_attn.proj.weight" in warnings[0] and "_Opaque" in warnings[0], warnings
    with sc.LogCapture() as logs:
        got = sc.forward(patched, inputs)
    assert not [r for r in logs.records if "freefuse" in r.getMessage()]
    assert sc.max_rel_diff(got, expected) <= REL_TOL
