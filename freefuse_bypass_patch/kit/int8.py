"""Tiny INT8 Wan 2.1 models for the tests and the benchmark, loaded by ComfyUI from a checkpoint.

Since 0.30 ``comfy.ops.linear_input_act`` runs an MLP's down-projection (Wan ``ffn.2``) straight
through ``comfy_kitchen.int8_linear`` when its weight is an INT8 tensor-wise ``QuantizedTensor``:
the module is never called. To test that path as users hit it, a tiny Wan 2.1 built by ComfyUI's
own classes is written as safetensors with chosen layers quantized (int8 weight, fp32
``weight_scale``, per-layer ``comfy_quant`` ``{"format": "int8_tensorwise"}``) and loaded by
``comfy.sd.load_diffusion_model``: model detection and ``mixed_precision_ops`` make the
``QuantizedTensor`` themselves.
"""

from __future__ import annotations

import contextlib
import json
from typing import Dict, Iterable, Iterator, List, Tuple

import torch

from .models import random_patcher

# Wan 2.1 t2v as model detection reads it, tiny: detection takes dim, ffn_dim, in/out dims and the
# block count from the weights; num_heads (dim // 128) and text_dim (not detected) come from the
# checkpoint's "config" metadata (WAN_METADATA). 2 blocks, ~0.7M parameters at dim 128.
TINY_WAN = dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), in_dim=16, dim=128, ffn_dim=256,
                freq_dim=256, text_dim=32, out_dim=16, num_heads=2, num_layers=2, window_size=(-1, -1),
                qk_norm=True, cross_attn_norm=True, eps=1e-6)
# the layers written as INT8 by default: Wan's down-projection, which linear_input_act runs
INT8_LAYERS = ("ffn.2",)


def has_input_act_linear() -> bool:
    """Does this ComfyUI run ``linear(act(x))`` without calling the module (``comfy.ops.linear_input_act``)?"""
    import comfy.ops

    return callable(getattr(comfy.ops, "linear_input_act", None))


def wan_config(**sizes) -> dict:
    """``TINY_WAN`` with other sizes (dim, ffn_dim, num_layers, num_heads, text_dim)."""
    return dict(TINY_WAN, **sizes)


def quantize_int8(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Tensor-wise symmetric INT8, as an INT8 checkpoint stores it: int8 data and one fp32 scale
    (absmax / 127), with weight ≈ data · scale."""
    scale = weight.detach().abs().max().float().clamp_min(1e-12) / 127.0
    data = torch.round(weight.detach().float() / scale).clamp_(-127, 127).to(torch.int8)
    return data, scale.reshape(())


def wan_checkpoint(seed: int = 0, int8: Iterable[str] = INT8_LAYERS, **sizes) -> Tuple[Dict[str, torch.Tensor],
                                                                                       Dict[str, str]]:
    """(state dict, metadata) of a random Wan 2.1 t2v built by ComfyUI's classes, the block Linears whose
    name ends with one of ``int8`` (e.g. "ffn.2") stored as INT8 tensor-wise with ``comfy_quant``."""
    import comfy.supported_models

    config = wan_config(**sizes)
    patcher = random_patcher(comfy.supported_models.WAN21_T2V(dict(config)), seed)
    sd = {k: v.detach().clone().contiguous() for k, v in patcher.model.diffusion_model.state_dict().items()}
    suffixes = tuple(int8)
    for key in [k for k in sd if k.startswith("blocks.") and k.endswith(".weight")]:
        layer = key[:-len(".weight")]
        if sd[key].dim() == 2 and layer.endswith(suffixes):
            sd[key], sd[layer + ".weight_scale"] = quantize_int8(sd[key])
            sd[layer + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": "int8_tensorwise"}).encode()),
                                                      dtype=torch.uint8)
    metadata = {"config": json.dumps({"transformer": {"num_heads": config["num_heads"],
                                                      "text_dim": config["text_dim"]}})}
    return sd, metadata


def save_checkpoint(sd: Dict[str, torch.Tensor], metadata: Dict[str, str], path: str) -> str:
    from safetensors.torch import save_file

    save_file(sd, path, metadata=metadata)
    return path


def load_wan(path: str):
    """A ModelPatcher from ComfyUI's own diffusion-model loader (detection, mixed-precision ops), fp32 compute."""
    import comfy.sd

    return comfy.sd.load_diffusion_model(path, model_options={"dtype": torch.float32})


def int8_modules(patcher) -> List[str]:
    """Names of the modules whose weight is an INT8 tensor-wise ``QuantizedTensor``."""
    out = []
    for name, module in patcher.model.diffusion_model.named_modules():
        weight = getattr(module, "weight", None)
        if getattr(weight, "_layout_cls", None) == "TensorWiseINT8Layout":
            out.append(name)
    return out


def wan_inputs(seed: int = 1, frames: int = 1, image: int = 8, tokens: int = 6, config=None) -> dict:
    """A Wan latent (1, 16, ``frames``, ``image``, ``image``), t and ``tokens`` text features."""
    config = config or TINY_WAN
    gen = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(1, config["in_dim"], frames, image, image, generator=gen), t=torch.full((1,), 0.5),
                c_crossattn=torch.randn(1, tokens, config["text_dim"], generator=gen))


@contextlib.contextmanager
def counting_int8_linear() -> Iterator[List[int]]:
    """Count calls of ``comfy_kitchen.int8_linear`` (what ``comfy.ops.linear_input_act`` calls, looked up
    through ``comfy.quant_ops.ck`` at call time) while active; yields a one-item list [count]."""
    import comfy.quant_ops

    ck = comfy.quant_ops.ck
    original, count = ck.int8_linear, [0]

    def int8_linear(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    ck.int8_linear = int8_linear
    try:
        yield count
    finally:
        ck.int8_linear = original
