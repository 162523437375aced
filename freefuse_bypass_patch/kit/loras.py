"""Random LoRA state dicts in every naming convention, derived from ComfyUI's own key map.

Each convention produces exactly the keys that ComfyUI recognises in the tree under test,
so every tuple target (fused slice, diff function) the tree knows is exercised.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

CONVENTIONS = {
    "diffusers": ("transformer.", ".lora_B.weight", ".lora_A.weight"),
    "onetrainer": ("lora_transformer_", ".lora_up.weight", ".lora_down.weight"),
    "lycoris": ("lycoris_", ".lora_up.weight", ".lora_down.weight"),
    "kohya": ("lora_unet_", ".lora_up.weight", ".lora_down.weight"),
    "native": ("diffusion_model.", ".lora_up.weight", ".lora_down.weight"),
}


def lora_targets(model, convention: str) -> List[Tuple[str, object, Tuple[int, int]]]:
    """(lora name, key-map target, (out rows, in features)) for every 2-D weight the convention reaches."""
    return named_targets(model, CONVENTIONS[convention][0])


def named_targets(model, prefix: str) -> List[Tuple[str, object, Tuple[int, int]]]:
    """(lora name, key-map target, (out rows, in features)) for every 2-D weight named under ``prefix``."""
    import comfy.lora

    from ..loader import model_tensors

    key_map = comfy.lora.model_lora_keys_unet(model, {})
    shapes = {k: tuple(v.shape) for k, v in model_tensors(model).items()}  # logical shapes (GGUF too)
    out = []
    for name, target in key_map.items():
        if not name.startswith(prefix):
            continue
        weight_key = target if isinstance(target, str) else target[0]
        shape = shapes.get(weight_key)
        if shape is None or len(shape) != 2 or not weight_key.endswith(".weight"):
            continue
        rows = shape[0]
        if isinstance(target, tuple) and target[1] is not None:
            rows = target[1][2]
        out.append((name, target, (rows, shape[1])))
    return sorted(out, key=lambda item: item[0])


def make_lora(model, convention: str, rank: int = 4, seed: int = 0, alpha: Optional[float] = None,
              scale: float = 0.2, only: Optional[str] = None,
              include: Optional[Callable[[str], bool]] = None) -> Dict[str, torch.Tensor]:
    """A random LoRA state dict in ``convention`` naming.

    ``only`` keeps "slices" or "whole" targets; ``include(weight_key)`` filters targets.
    """
    def keep(weight_key, fused):
        if include is not None and not include(weight_key):
            return False
        return not (only == "slices" and not fused or only == "whole" and fused)

    return random_lora(lora_targets(model, convention), convention, rank, seed, scale, alpha, keep)


def random_lora(targets, convention: str, rank: int, seed: int, scale: float, alpha: Optional[float] = None,
                keep: Optional[Callable[[str, bool], bool]] = None,
                one_name_per_target: bool = False) -> Dict[str, torch.Tensor]:
    """Random factors for (name, target, (rows, cols)) from the key map, named as ``convention``.

    A weight reached through slices gets no whole-weight name too (e.g. Flux2's
    to_qkv_mlp_proj for linear1: a Flux.1 LoRA has the slices only).
    """
    _, up_suffix, down_suffix = CONVENTIONS[convention]
    sliced = {t[0] for _, t, _ in targets if isinstance(t, tuple) and t[1] is not None}
    gen = torch.Generator().manual_seed(seed)
    sd, seen = {}, set()
    for name, target, (rows, cols) in targets:
        fused = isinstance(target, tuple) and target[1] is not None
        weight_key = target if isinstance(target, str) else target[0]
        if not fused and weight_key in sliced:
            continue
        if one_name_per_target and target in seen or keep is not None and not keep(weight_key, fused):
            continue
        seen.add(target)
        sd[name + down_suffix] = torch.randn(rank, cols, generator=gen) * scale
        sd[name + up_suffix] = torch.randn(rows, rank, generator=gen) * scale
        if alpha is not None:
            sd[name + ".alpha"] = torch.tensor(float(alpha))
    return sd


def family_lora(model, family: str, seed: int = 0, rank: int = 4, convention: str = "diffusers",
                scale: float = 0.2, alpha: Optional[float] = None,
                include: Optional[Callable[[str], bool]] = None) -> Dict[str, torch.Tensor]:
    """A random LoRA on every 2-D weight that ``convention`` names in ComfyUI's key map.

    Fused weights get their slices (to_q/to_k/to_v, ...), function tuples (swap_scale_shift)
    their whole weight; each target gets one name only (load_lora keeps one patch per
    target), and a weight reached through slices gets no whole-weight name too. For
    "diffusers" the prefix is "transformer." where the key map has tuple targets under it,
    else "unet." (SDXL/SD1: ``unet.down_blocks.N.attentions.K...processor.to_q``), else
    "diffusion_model." (ComfyUI 0.3.75 maps Lumina2's diffusers names only there).
    ``family`` is unused beyond documentation: everything comes from the model's key map.
    ``include(weight_key)`` filters the targets.
    """
    if convention == "diffusers":
        targets = named_targets(model, "transformer.")
        if not any(isinstance(t, tuple) for _, t, _ in targets):
            targets = named_targets(model, "unet.") or named_targets(model, "diffusion_model.") or targets
    else:
        targets = lora_targets(model, convention)
    keep = (lambda weight_key, fused: include(weight_key)) if include is not None else None
    return random_lora(targets, convention, rank, seed, scale, alpha, keep, one_name_per_target=True)


def key_forms(loaded) -> Dict[str, int]:
    """Counts of the key forms in ``comfy.lora.load_lora`` output: whole, slice, function."""
    forms = dict(whole=0, slice=0, function=0)
    for key in loaded:
        if isinstance(key, str):
            forms["whole"] += 1
        elif len(key) > 2 and key[2] is not None:
            forms["function"] += 1
        elif key[1] is not None:
            forms["slice"] += 1
        else:
            forms["whole"] += 1
    return forms


def save_lora(sd: Dict[str, torch.Tensor], path: str) -> str:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return path


def load_lora_file(path: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)
