"""An independent masked reference for the token-mask tests: the base model plus one forward
hook per LoRA adapter that adds m ⊙ s·(α/r)·up(down x) into its slice of the output.

The token rules are issue 15's, written here from the model code, not from the plugin:

* flux: ``double_blocks.N.img_*`` see [image | rest], ``txt_*`` [text], ``single_blocks.N.
  linear1/2`` [text | image | rest]; sd3: ``x_block`` [image], ``context_block`` [text];
* sdxl: in the SpatialTransformers, ``attn1.*``, ``attn2.to_q/to_out.0``, ``ff.net.0.proj/2``
  see the image at that transformer's own (h, w), read here from its input with a
  forward pre-hook; the mask is resized to it bilinearly (align_corners=False);
* lumina (Lumina2, Z-Image): the main ``layers.N`` attention/feed-forward see
  [text | caption padding | image | image padding], padding to the model's multiple;
* DiT grids of another size: nearest-exact. Padding, rest and unmasked runs: scale 1.
"""

import contextlib
import math
import re

import pytest
import torch
import torch.nn.functional as F

import comfy.lora
import comfy.lora_convert

from freefuse_bypass_patch import kit as sc

ROLES = {
    "flux": [(r"^double_blocks\.\d+\.img_(attn|mlp)\.", "image"), (r"^double_blocks\.\d+\.txt_(attn|mlp)\.", "text"),
             (r"^single_blocks\.\d+\.linear(1|2)$", "joint")],
    "sd3": [(r"^joint_blocks\.\d+\.x_block\.(attn|attn2|mlp)\.", "image"),
            (r"^joint_blocks\.\d+\.context_block\.(attn|mlp)\.", "text")],
    "sdxl": [(r"\.1\.transformer_blocks\.\d+\.(attn1\.to_(q|k|v|out\.0)|attn2\.to_(q|out\.0)|ff\.net\.(0\.proj|2))$",
              "image")],
    "lumina": [(r"^layers\.\d+\.(attention\.(qkv|out)|feed_forward\.w(1|2|3))$", "caption_image")],
}
LAYOUT = {"flux": "flux", "flux2": "flux", "chroma": "flux", "sd3": "sd3", "sdxl": "sdxl", "lumina2": "lumina",
          "zimage": "lumina"}


def role(family, path):
    for pattern, name in ROLES[LAYOUT[family]]:
        if re.search(pattern, path):
            return name
    return None


def grid_of(family, base, inputs):
    patch = {"sdxl": 1}.get(family, getattr(base.model.diffusion_model, "patch_size", 2))
    patch = patch[-1] if isinstance(patch, (tuple, list)) else patch
    return math.ceil(inputs["x"].shape[-2] / patch), math.ceil(inputs["x"].shape[-1] / patch)


def adapters(base, sd):
    """[(module path, output slice or None, up, down, scale before strength)] of a plain LoRA state dict."""
    key_map = comfy.lora.model_lora_keys_unet(base.model, {})
    out = []
    for key, adapter in comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(sd)), key_map).items():
        if isinstance(key, tuple) and len(key) > 2 and key[2] is not None:
            pytest.fail("the reference handles no diff function: %r" % (key,))
        weight_key, offset = (key, None) if isinstance(key, str) else (key[0], key[1])
        up, down, alpha = adapter.weights[:3]
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        out.append((weight_key[: -len(".weight")].replace("diffusion_model.", "", 1), offset, up, down, scale))
    return out


def without_functions(base, sd):
    """``sd`` without the names whose target is a diff function (e.g. swap_scale_shift): not LoRA math."""
    key_map = comfy.lora.model_lora_keys_unet(base.model, {})
    functions = {name for name, target in key_map.items()
                 if isinstance(target, tuple) and len(target) > 2 and target[2] is not None}
    return {k: v for k, v in sd.items() if k.rsplit(".lora_", 1)[0].rsplit(".alpha", 1)[0] not in functions}


def masked_reference(family, base, inputs, loras):
    """Output of ``base`` with ``loras`` = [(state dict, strength, image mask, text mask)] applied by the
    reference hooks. Image masks: (H, W) or (rows, H, W) grids; text masks: (N_txt,) or (rows, N_txt)."""
    with reference_hooks(family, base, grid_of(family, base, inputs), inputs["c_crossattn"].shape[1], loras):
        return sc.forward(base, inputs)


@contextlib.contextmanager
def reference_hooks(family, base, grid, n_txt, loras):
    """The reference hooks on ``base``'s modules while inside (for forwards or a whole sampling run)."""
    model = base.model.diffusion_model
    n_img = grid[0] * grid[1]
    multiple = getattr(model, "pad_tokens_multiple", None) if LAYOUT[family] == "lumina" else None
    image_pad = (-n_img) % multiple if multiple else 0
    level = {}
    handles = []
    if family == "sdxl":
        for module in model.modules():
            if type(module).__name__ == "SpatialTransformer":
                handles.append(module.register_forward_pre_hook(
                    lambda m, args: level.__setitem__("hw", tuple(args[0].shape[-2:]))))

    def image_at(mask, hw):
        mask = mask if mask.dim() == 3 else mask[None]
        if tuple(mask.shape[1:]) != hw:
            mode = dict(mode="bilinear", align_corners=False) if family == "sdxl" else dict(mode="nearest-exact")
            mask = F.interpolate(mask[:, None].float(), size=hw, **mode)[:, 0]
        return mask.reshape(mask.shape[0], -1)

    def scale_for(kind, x, image, text):
        batch, tokens = x.shape[0], x.shape[1]
        text = (text if text.dim() == 2 else text[None]) if text is not None else torch.ones(1, n_txt)
        img = (lambda hw: image_at(image, hw)) if image is not None else (lambda hw: torch.ones(1, hw[0] * hw[1]))
        ones = lambda n: torch.ones(1, n)  # noqa: E731
        if kind == "image" and family == "sdxl":
            parts = [img(level["hw"])]
        elif kind == "image":
            parts = [img(grid), ones(tokens - n_img)]
        elif kind == "joint":
            parts = [text, img(grid), ones(tokens - n_txt - n_img)]
        elif kind == "text":
            parts = [text, ones(tokens - n_txt)]
        else:  # caption_image
            caption = tokens - n_img - image_pad
            parts = [text, ones(caption - n_txt), img(grid), ones(image_pad)]
        return torch.cat([p.expand(batch, -1) for p in parts], dim=1)[:, :, None]

    def make(up, down, scale, offset, image, text, kind):
        def hook(module, args, out):
            x = args[0]
            term = F.linear(F.linear(x, down), up) * scale
            if kind is not None and (image is not None or text is not None):
                term = term * scale_for(kind, x, image, text)
            out = out.clone()
            if offset is None:
                out += term
            else:
                out[..., offset[1]:offset[1] + offset[2]] += term
            return out
        return hook

    for sd, strength, image, text in loras:
        for path, offset, up, down, scale in adapters(base, sd):
            hook = make(up, down, strength * scale, offset, image, text, role(family, path))
            handles.append(model.get_submodule(path).register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
