"""``check --masks``: a picture of where two masked bypass LoRAs act, per image token.

Numbers say little about regions; a picture does. Two random LoRAs ("left", "right") are
chained on a tiny Flux, SDXL or Z-Image (``--model``) with complementary half masks, and
for each LoRA two per-token maps are measured against the same chain with that LoRA's
mask set to zero:

* modules: the term the LoRA adds inside every Linear, fed the same input in both runs
  (the masked run's inputs are replayed), so only the LoRA's own term differs. This is the
  mechanism; outside its mask it must be exactly zero, and text tokens must be untouched.
* output: the change of the model's output. Attention mixes tokens, so this map leaks
  across the border; the printed inside/outside means say by how much.

Part of the self-check (imports the kit); the runtime never imports it.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import torch

from .comfyui import start_quietly
from .compare import apply_model
from .loras import family_lora, make_lora
from .models import flux_inputs, tiny_flux, tiny_inputs, tiny_model

GRID = 16  # token grid side: a 32x32 latent (patch 2; SDXL: its first transformer level)
CELL = 16  # pixels per token in the PNG
MARGIN = 8
TITLE = 14  # height of a text row
PANELS = ("in the modules", "model output")
NAMES = ("left", "right")
MODELS = ("flux", "sdxl", "zimage")
LABELS = {"flux": "Flux", "sdxl": "SDXL", "zimage": "Z-Image"}
COLOURS = ((255, 60, 60), (60, 120, 255))  # left: red, right: blue
SIZE = (len(PANELS) * GRID * CELL + (len(PANELS) + 1) * MARGIN, 2 * MARGIN + GRID * CELL + 2 * TITLE + MARGIN)


def panel_origin(index: int) -> Tuple[int, int]:
    """Top-left pixel of panel ``index``'s token grid."""
    return MARGIN + index * (GRID * CELL + MARGIN), MARGIN + TITLE


def half_masks() -> Dict[str, torch.Tensor]:
    left = torch.zeros(GRID, GRID)
    left[:, : GRID // 2] = 1.0
    return {"left": left, "right": 1.0 - left}


def run(comfyui: Optional[str], out_path: str = "freefuse_masks.png", family: str = "flux") -> int:
    """Build, measure, draw and print; 0 when the masks confine each LoRA's term to its half."""
    if family not in MODELS:
        print("token mask pictures are drawn for %s, not %r" % (", ".join(MODELS), family))
        return 2
    out_path = os.path.abspath(out_path)  # before use_comfyui, which may change directory
    comfyui = start_quietly(comfyui)
    if comfyui is None:
        return 2
    import comfy.sd

    from .. import install, is_patched
    from ..masks import lora_name, with_lora_masks
    from ..patching import capabilities, comfyui_version

    install()
    print("ComfyUI %s at %s" % (comfyui_version(), comfyui))
    caps = capabilities()
    if caps is None or not caps.bypass_module:
        print("token masks need ComfyUI's bypass mode (0.11 and later); this ComfyUI has none")
        return 2
    if not is_patched():
        print("the plugin is not active (%s): token masks need it" % "; ".join(caps.problems or ["disabled"]))
        return 2

    if family == "flux":
        base, inputs = tiny_flux(0), flux_inputs(image=2 * GRID)
    else:
        base, inputs = tiny_model(family), tiny_inputs(family, image=2 * GRID)
    chain = base
    for seed, name in enumerate(NAMES, start=11):
        if family == "flux":
            lora = make_lora(base.model, "diffusers", rank=4, seed=seed, alpha=4)
        else:
            lora = family_lora(base.model, family, seed=seed, rank=4)
        with lora_name(name):
            chain = comfy.sd.load_bypass_lora_for_models(chain, None, lora, 1.0, 0)[0]
    masks = half_masks()
    masked = with_lora_masks(chain, masks)
    tokens = _token_layout(family, base, inputs)

    out, taps = _run(masked, inputs)
    maps, text_max = {}, 0.0
    for name in NAMES:
        off = with_lora_masks(masked, {name: torch.zeros(GRID, GRID)})
        out_off, _ = _run(off, inputs)
        _, taps_off = _run(off, inputs, replay=[x for x, _ in taps])
        term, text_part = _module_term(taps, taps_off, tokens)
        maps[name] = (term, _output_term(out, out_off))
        text_max = max(text_max, text_part)

    print("two random diffusers LoRAs (rank 4) on a tiny %s, %s; mask 'left' = left half, 'right' = right half"
          % (LABELS[family], tokens["describe"]))
    print("per image token, the L2 norm of what each LoRA adds (vs the same chain with its mask set to zero):")
    print("%-16s %-6s %12s %12s %16s" % ("measure", "LoRA", "inside", "outside", "outside/inside"))
    ok = text_max == 0.0
    for name in NAMES:
        inside = masks[name].bool()
        for label, values in zip(PANELS, maps[name]):
            mean_in, mean_out = float(values[inside].mean()), float(values[~inside].mean())
            print("%-16s %-6s %12.3e %12.3e %16.3f" % (label, name, mean_in, mean_out, mean_out / mean_in))
            if label == PANELS[0]:
                ok = ok and float(values[~inside].max()) == 0.0 and float(values[inside].min()) > 0.0
            else:
                ok = ok and mean_in > mean_out
    print("text tokens: largest change of a LoRA's term when its mask is zeroed: %.3e (no text masks set)"
          % text_max)
    print("not masked, by design: text-side modules, modulation and layers outside the blocks (the same in both"
          " runs, so absent from these maps)")
    render(maps, out_path)
    print("The picture (red: LoRA 'left', blue: 'right', each scaled to its own maximum): left panel, the term"
          " each LoRA adds inside the modules; right panel, the change of the model's output, which attention"
          " spreads across the border.")
    print("wrote %s" % out_path)
    print("RESULT: %s" % ("each LoRA acts only inside its mask" if ok else "MASKS LEAK"))
    return 0 if ok else 1


def _run(patcher, inputs, replay: Optional[List[torch.Tensor]] = None):
    """One forward; (output, [(input, output)] of every Linear with token input, in call order).

    With ``replay``, each of those Linears gets the recorded input instead of its own.
    """
    import comfy.model_management as mm

    taps: List[Tuple[torch.Tensor, torch.Tensor]] = []
    handles = []

    def feed(module, args):
        return (replay[len(taps)],) + tuple(args[1:])

    def record(module, args, output):
        taps.append((args[0].detach().clone(), output.detach().clone()))

    mm.load_models_gpu([patcher])  # attaches the plugin's hooks: ours, registered after, see their result
    try:
        for module in patcher.model.diffusion_model.modules():
            if isinstance(module, torch.nn.Linear):
                if replay is not None:
                    handles.append(module.register_forward_pre_hook(
                        lambda m, args: feed(m, args) if args[0].dim() == 3 else None))
                handles.append(module.register_forward_hook(
                    lambda m, args, out: record(m, args, out) if args[0].dim() == 3 else None))
        out = apply_model(patcher, inputs).clone()
    finally:
        for handle in handles:
            handle.remove()
        mm.unload_all_models()
    return out, taps


def _token_layout(family: str, base, inputs) -> dict:
    """What the Linears of ``family`` see, by token count: image grids, text, text before the image.

    Flux: image modules the 16x16 grid, single blocks [text | grid], text modules the text.
    SDXL: the transformers at 16x16 and 8x8 (the 32x32 latent is not attended), attn2.to_k/v
    the text. Z-Image: the main layers [caption padded to 32 | grid], the refiners one of them.
    """
    text = inputs["c_crossattn"].shape[1]
    if family == "sdxl":
        return dict(levels={GRID * GRID: GRID, (GRID // 2) ** 2: GRID // 2}, before=None, text={text},
                    describe="%dx%d and %dx%d image tokens" % (GRID, GRID, GRID // 2, GRID // 2))
    if family == "zimage":
        multiple = base.model.diffusion_model.pad_tokens_multiple
        padded = text + (-text) % multiple
        return dict(levels={GRID * GRID: GRID}, before=padded, text={text, padded},
                    describe="%dx%d image tokens after %d caption tokens" % (GRID, GRID, padded))
    return dict(levels={GRID * GRID: GRID}, before=text, text={text}, describe="%dx%d image tokens" % (GRID, GRID))


def _module_term(taps, taps_off, layout: dict) -> Tuple[torch.Tensor, float]:
    """(GRID, GRID) norm of the term over all Linears, and the largest change on text tokens.

    A coarser grid (SDXL's 8x8 level) counts on every display token it covers.
    """
    squares = torch.zeros(GRID, GRID)
    text_max = 0.0
    if len(taps) != len(taps_off) or any(not torch.equal(a[0], b[0]) for a, b in zip(taps, taps_off)):
        raise RuntimeError("the replayed forward did not feed every Linear its recorded input")
    levels, before = layout["levels"], layout["before"]
    for (_, y), (_, y_off) in zip(taps, taps_off):
        diff = (y - y_off)[0]
        tokens = diff.shape[0]
        if tokens in levels:
            image = diff
        elif before is not None and tokens - before in levels:
            image = diff[before:]
            text_max = max(text_max, float(diff[:before].abs().max()))
        elif tokens in layout["text"]:
            text_max = max(text_max, float(diff.abs().max()))
            continue
        elif bool((diff != 0).any()):  # e.g. a modulation vector as one token: never masked
            raise RuntimeError("a Linear that saw %d tokens changed with a mask; this picture does not place it" % tokens)
        else:
            continue
        side = levels[image.shape[0]]
        cells = image.pow(2).sum(-1).reshape(side, side)
        squares += cells.repeat_interleave(GRID // side, 0).repeat_interleave(GRID // side, 1)
    return squares.sqrt(), text_max


def _output_term(out: torch.Tensor, out_off: torch.Tensor) -> torch.Tensor:
    """(GRID, GRID) norm of the output change over each token's channels and 2x2 latent pixels."""
    diff = (out - out_off)[0]
    channels = diff.shape[0]
    return diff.reshape(channels, GRID, 2, GRID, 2).pow(2).sum((0, 2, 4)).sqrt()


def render(maps: Dict[str, Tuple[torch.Tensor, torch.Tensor]], path: str) -> None:
    """Two panels (modules, output), one RGB square per token, each LoRA in its colour."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", SIZE, (0, 0, 0))
    draw = ImageDraw.Draw(image)
    for index, label in enumerate(PANELS):
        rgb = torch.zeros(GRID, GRID, 3)
        for name, colour in zip(NAMES, COLOURS):
            values = maps[name][index]
            rgb += (values / values.max().clamp_min(1e-30))[..., None] * torch.tensor(colour, dtype=torch.float32)
        pixels = rgb.clamp(0, 255).to(torch.uint8).numpy()
        tile = Image.fromarray(pixels, "RGB").resize((GRID * CELL, GRID * CELL), Image.NEAREST)
        x0, y0 = panel_origin(index)
        image.paste(tile, (x0, y0))
        draw.text((x0, MARGIN // 2), label, fill=(230, 230, 230))
    legend_y = MARGIN + TITLE + GRID * CELL + MARGIN // 2
    draw.text((MARGIN, legend_y), "red: LoRA 'left' (mask: left half)", fill=COLOURS[0])
    draw.text((SIZE[0] // 2, legend_y), "blue: LoRA 'right' (mask: right half)", fill=COLOURS[1])
    image.save(path)
