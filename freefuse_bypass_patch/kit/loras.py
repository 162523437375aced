"""Random LoRA state dicts in every naming convention, derived from ComfyUI's own key map,
and random adapters of every type (the one generator the tests and benchmarks use).

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


# -- adapters of every type -------------------------------------------------------------
ADAPTER_KINDS = ("lora", "dora", "dora_in", "loha", "lokr", "glora", "glora_old", "oft", "boft",
                 "dora_loha", "dora_lokr", "dora_glora", "dora_oft")
# DoRA kind -> the adapter whose factors it carries (dora_in: magnitudes on the input axis)
_DORA_OVER = {"dora": "lora", "dora_in": "lora", "dora_loha": "loha", "dora_lokr": "lokr", "dora_glora": "glora",
              "dora_oft": "oft"}
# kind -> (alpha, scale) where the caller names none: visible effects on the tiny models, sane outputs
_DEFAULTS = {"lora": (2.0, 0.2), "dora": (4.0, 0.2), "dora_in": (4.0, 0.2), "loha": (4.0, 0.6), "lokr": (1.0, 0.2),
             "glora": (4.0, 0.2), "glora_old": (4.0, 0.2), "oft": (1.0, 0.4), "boft": (1.0, 0.2)}


def adapter_factors(kind: str, rows: int, cols: int, gen: torch.Generator, rank: int = 4,
                    scale: Optional[float] = None, alpha: Optional[float] = None, *, w1_rank: Optional[int] = None,
                    w2_rank: Optional[int] = None, factor: int = 4, block: int = 16, stages: int = 2,
                    rescale: bool = False, magnitude: Optional[torch.Tensor] = None,
                    magnitude_scale: float = 0.2) -> Dict[str, torch.Tensor]:
    """Random factors of one ``kind`` adapter (see ADAPTER_KINDS) for a (rows x cols) weight, as
    {key suffix: tensor}, shaped as LyCORIS/kohya trainers save them and drawn from ``gen`` in
    key order.

    Entries are N(0, ``scale``²) (default per kind, with ``alpha``: _DEFAULTS); ``rank`` is the
    LoRA/LoHa/GLoRA rank. LoKr: ``lokr_w1`` is ``factor`` x ``factor``, ``lokr_w2`` the rest;
    ``w1_rank``/``w2_rank`` store either as a low-rank pair (``_a``, ``_b``). OFT/BOFT: blocks
    of ``block`` rows, BOFT in ``stages`` butterfly stages (``rescale``: with per-row rescales).
    "glora_old" is GLoRA's earlier layout (a1/b1 as r x in, a2 as in x r, b2 as out x r). The
    DoRA kinds add ``dora_scale`` after the factors of the adapter they carry: per output row
    (per input column for "dora_in"), ``magnitude`` (e.g. the weight's row norms; default 1)
    times 1 + N(0, ``magnitude_scale``²), as are BOFT's rescales.
    """
    if kind not in ADAPTER_KINDS:
        raise ValueError("unknown adapter kind %r; one of: %s" % (kind, ", ".join(ADAPTER_KINDS)))
    carried = _DORA_OVER.get(kind, kind)
    default_alpha, default_scale = _DEFAULTS.get(kind, _DEFAULTS[carried])
    std = default_scale if scale is None else scale

    def r(*shape):
        return torch.randn(*shape, generator=gen) * std

    def pair(key, n, m, low_rank):
        if low_rank is None:
            return {key: r(n, m)}
        return {key + "_a": r(n, low_rank), key + "_b": r(low_rank, m)}

    if carried == "lora":
        factors = {"lora_up.weight": r(rows, rank), "lora_down.weight": r(rank, cols)}
    elif carried == "loha":
        factors = {"hada_w1_a": r(rows, rank), "hada_w1_b": r(rank, cols), "hada_w2_a": r(rows, rank),
                   "hada_w2_b": r(rank, cols)}
    elif carried == "lokr":
        factors = dict(pair("lokr_w1", factor, factor, w1_rank), **pair("lokr_w2", rows // factor, cols // factor,
                                                                        w2_rank))
    elif carried == "glora":  # W'·a1·a2 + b1·b2: a1 in x r, a2 r x in, b1 out x r, b2 r x in
        factors = {"a1.weight": r(cols, rank), "a2.weight": r(rank, cols), "b1.weight": r(rows, rank),
                   "b2.weight": r(rank, cols)}
    elif carried == "glora_old":
        factors = {"a1.weight": r(rank, cols), "a2.weight": r(cols, rank), "b1.weight": r(rank, cols),
                   "b2.weight": r(rows, rank)}
    elif carried == "oft":
        factors = {"oft_blocks": r(rows // block, block, block)}
    else:  # boft: a leading butterfly-stage dim
        factors = {"oft_blocks": r(stages, rows // block, block, block)}
    factors["alpha"] = torch.tensor(float(default_alpha if alpha is None else alpha))

    def around(base, *shape):
        jitter = 1.0 + torch.randn(*shape, generator=gen) * magnitude_scale
        return jitter if base is None else base * jitter

    if carried == "boft" and rescale:
        factors["rescale"] = around(None, rows, 1)
    if kind in _DORA_OVER:
        factors["dora_scale"] = around(magnitude, *((1, cols) if kind == "dora_in" else (rows, 1)))
    return factors


def adapter_fits(kind: str, rows: int, cols: int, factor: int = 4, block: int = 16) -> bool:
    """Whether a ``kind`` adapter tiles a (rows x cols) weight: LoKr's Kronecker factor, OFT's blocks."""
    carried = _DORA_OVER.get(kind, kind)
    if carried == "lokr":
        return rows % factor == 0 and cols % factor == 0
    if carried in ("oft", "boft"):
        return rows % block == 0
    return True


def adapter_targets(model, convention: str) -> List[Tuple[str, object, Tuple[int, int]]]:
    """``lora_targets``; with names other than kohya's only the fused slices (what those names add)."""
    targets = lora_targets(model, convention)
    if convention == "kohya":
        return targets
    return [t for t in targets if isinstance(t[1], tuple) and t[1][1] is not None]


def adapter_lora(model, kind: str, convention: str = "kohya", seed: int = 0, limit: Optional[int] = None,
                 targets=None, dtype: Optional[torch.dtype] = None, weight_norms: bool = False,
                 **options) -> Dict[str, torch.Tensor]:
    """A state dict with one ``kind`` adapter (``adapter_factors(**options)``) on each target.

    Targets are (name, key-map target, (rows, cols)) as ``lora_targets``/``named_targets`` give
    them (default: ``adapter_targets(model, convention)``), taken in order, each target once,
    skipping those the adapter does not tile, up to ``limit``. ``dtype``: the factors stored in
    it (alpha stays fp32), as a trainer saving in that precision would. ``weight_norms``: DoRA
    magnitudes around the weight's own row (for "dora_in": column) norms, as a trained DoRA's
    are (default: around 1).
    """
    targets = adapter_targets(model, convention) if targets is None else targets
    tiling = {k: options[k] for k in ("factor", "block") if k in options}
    weights = model.state_dict() if weight_norms and kind in _DORA_OVER else None
    gen = torch.Generator().manual_seed(seed)
    sd, seen = {}, set()
    for name, target, (rows, cols) in targets:
        if limit is not None and len(seen) >= limit:
            break
        if target in seen or not adapter_fits(kind, rows, cols, **tiling):
            continue
        seen.add(target)
        magnitude = None
        if weights is not None:
            weight = weights[target if isinstance(target, str) else target[0]]
            if isinstance(target, tuple) and target[1] is not None:
                weight = weight.narrow(*target[1])
            axis = 0 if kind == "dora_in" else 1  # the norms along the axis the magnitudes scale
            magnitude = weight.detach().float().norm(dim=axis, keepdim=True).cpu()
        for suffix, tensor in adapter_factors(kind, rows, cols, gen, magnitude=magnitude, **options).items():
            sd["%s.%s" % (name, suffix)] = tensor if dtype is None or suffix == "alpha" else tensor.to(dtype)
    return sd


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
