"""Token layouts: which tokens each module of a diffusion model sees, per family.

A mask is only right if it lands on the right tokens. Modules inside the blocks receive no
per-call information, so the geometry of a forward (batch, image grid, text length,
padding) is read from the diffusion model's own arguments (:class:`Geometry`), and a
module's role comes from its path. A role is a sequence of token runs, each ``text``,
``image`` (at a grid) or unmasked; facts from ComfyUI 0.28.0's model code (the same in
every pinned tree that has the family):

* ``flux`` (Flux, Flux2/Klein, Chroma): ``double_blocks.N.img_attn/img_mlp`` see
  ``[image | reference latents]``, ``txt_attn/txt_mlp`` ``[text]``,
  ``single_blocks.N.linear1/linear2`` ``[text | image | reference latents]``.
* ``sd3`` (MMDiT): ``x_block.attn/attn2/mlp`` ``[image]``, ``context_block.attn/mlp``
  ``[registers | text]``.
* ``unet`` (SDXL, SD1.x ``UNetModel``): in every SpatialTransformer's blocks, ``attn1.*``,
  ``attn2.to_q/to_out.0``, ``ff.net.0.proj/ff.net.2`` see ``[image]`` at that level's grid
  (ComfyUI downsamples with ceil: 14x18 -> 7x9 -> 4x5); ``attn2.to_k/to_v`` see the text
  but are not masked (FreeFuse's SDXL reference).
* ``lumina`` (Lumina2, Z-Image ``NextDiT``): the main ``layers.N.attention.qkv/out`` and
  ``feed_forward.w1/w2/w3`` see ``[caption | caption padding | image | image padding]``
  (``torch.cat(feats + (x,))``; Z-Image pads both to a multiple of 32); refiners unmasked.

Everything else (modulation, embedders, final layers, refiners, ResBlocks, convs) is not
masked. Image masks drawn at another size than a grid are resized to it: bilinear
(``align_corners=False``) on the UNet, as FreeFuse resizes per level; nearest-exact on
the DiTs, whose masks are hard region maps.
"""

from __future__ import annotations

import functools
import math
import re
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F


class LoraMaskError(ValueError):
    """A mask that does not fit the LoRAs on the patcher, its model or the running forward."""


# layout -> [(module path pattern, role)]; the first match wins
_ROLES = {
    "flux": [(re.compile(r"(^|\.)double_blocks\.\d+\.img_(attn|mlp)\."), "image"),
             (re.compile(r"(^|\.)double_blocks\.\d+\.txt_(attn|mlp)\."), "text"),
             (re.compile(r"(^|\.)single_blocks\.\d+\.linear[12]$"), "joint")],
    "sd3": [(re.compile(r"(^|\.)joint_blocks\.\d+\.x_block\.(attn2?|mlp)\."), "image"),
            (re.compile(r"(^|\.)joint_blocks\.\d+\.context_block\.(attn|mlp)\."), "text")],
    "unet": [(re.compile(r"(^|\.)(input_blocks\.\d+|middle_block|output_blocks\.\d+)\.1\.transformer_blocks\.\d+\."
                         r"(attn1\.(to_q|to_k|to_v|to_out\.0)|attn2\.(to_q|to_out\.0)|ff\.net\.(0\.proj|2))$"), "image")],
    "lumina": [(re.compile(r"(^|\.)layers\.\d+\.(attention\.(qkv|out)|feed_forward\.w[123])$"), "caption_image")],
}

# Families whose masked modules see text tokens (text masks allowed).
TEXT_LAYOUTS = frozenset({"flux", "sd3", "lumina"})
FAMILY_NAMES = "Flux, Flux2, Chroma, SD3, SDXL/SD1 UNet, Lumina2, Z-Image"


def token_layout(diffusion_model: torch.nn.Module) -> Optional[str]:
    """``flux``, ``sd3``, ``unet``, ``lumina`` or None (masks refused: the tokens are not known here)."""
    module = type(diffusion_model).__module__
    if hasattr(diffusion_model, "double_blocks") and hasattr(diffusion_model, "single_blocks") and (
            module.startswith("comfy.ldm.flux") or module.startswith("comfy.ldm.chroma")):
        return "flux"
    if hasattr(diffusion_model, "joint_blocks") and module.startswith("comfy.ldm.modules.diffusionmodules.mmdit"):
        return "sd3"
    if module == "comfy.ldm.modules.diffusionmodules.openaimodel" and hasattr(diffusion_model, "input_blocks") \
            and not getattr(diffusion_model, "use_temporal_resblocks", False):
        return "unet"
    if module.startswith("comfy.ldm.lumina") and hasattr(diffusion_model, "layers") \
            and hasattr(diffusion_model, "cap_embedder"):
        return "lumina"
    return None


@functools.lru_cache(maxsize=4096)
def module_role(module_path: str, layout: Optional[str]) -> Optional[str]:
    """The role of the module at ``module_path`` (relative to the diffusion model) in ``layout``."""
    for pattern, role in _ROLES.get(layout, ()):
        if pattern.search(module_path):
            return role
    return None


# A run of tokens: (kind, length, grid); kind "text", "image" or None (scale 1).
Run = Tuple[Optional[str], int, Optional[Tuple[int, int]]]


class Geometry:
    """The tokens of one diffusion-model forward: batch, image grid(s), text and padding."""

    def __init__(self, layout: str, diffusion_model: torch.nn.Module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        context = kwargs.get("context", args[2] if len(args) > 2 else None)
        patch = getattr(diffusion_model, "patch_size", 1)
        patch = patch[-1] if isinstance(patch, (tuple, list)) else int(patch)
        self.layout, self.batch = layout, int(x.shape[0])
        self.grid = (math.ceil(x.shape[-2] / patch), math.ceil(x.shape[-1] / patch))
        self.image_tokens = self.grid[0] * self.grid[1]
        self.text_tokens = int(context.shape[1]) if isinstance(context, torch.Tensor) and context.dim() == 3 else 0
        self.registers = int(getattr(diffusion_model, "register_length", 0) or 0)  # SD3: before the text
        multiple = getattr(diffusion_model, "pad_tokens_multiple", None) if layout == "lumina" else None
        self.image_padding = (-self.image_tokens) % multiple if multiple else 0
        # Z-Image omni: reference captions come first, so the main caption is not at the start
        refs = kwargs.get("ref_latents")
        self.text_placeable = not (layout == "lumina" and (len(refs) if isinstance(refs, (list, tuple)) else
                                                           refs is not None))
        self.levels = {self.image_tokens: self.grid}  # the UNet: each level's grid by its token count
        if layout == "unet":
            h, w = self.grid
            for _ in range(len(getattr(diffusion_model, "channel_mult", ())) - 1):
                h, w = math.ceil(h / 2), math.ceil(w / 2)  # a stride-2 conv with padding 1
                self.levels.setdefault(h * w, (h, w))

    def describe(self) -> str:
        return "batch %d, %d text tokens and %d image tokens in a %dx%d grid" % (
            self.batch, self.text_tokens, self.image_tokens, self.grid[0], self.grid[1])

    def runs(self, role: str, tokens: int) -> List[Run]:
        """The token runs a module of ``role`` sees in this forward, given its token count."""
        n, t = self.image_tokens, self.text_tokens
        if role == "image" and self.layout == "unet":
            grid = self.levels.get(tokens)
            return [("image", tokens, grid)] if grid is not None else []
        if role == "image":
            runs = [("image", n, self.grid), (None, tokens - n, None)]
        elif role == "joint":
            runs = [("text", t, None), ("image", n, self.grid), (None, tokens - t - n, None)]
        elif role == "text":
            runs = [(None, self.registers, None), ("text", t, None), (None, tokens - self.registers - t, None)]
        elif role == "caption_image":
            before = tokens - n - self.image_padding
            text = ("text", t, None) if self.text_placeable else (None, t, None)
            runs = [text, (None, before - t, None), ("image", n, self.grid), (None, self.image_padding, None)]
        else:
            raise ValueError("unknown role %r" % role)
        return runs if all(length >= 0 for _, length, _ in runs) else []

    # -- fitting the masks to this forward -----------------------------------------
    def image_grid(self, mask: torch.Tensor, name: str) -> torch.Tensor:
        """(rows, H, W): a flat mask as its grid, a grid as it is; rows are 1 or the batch.

        A 2-D mask is ``(rows, N)`` only when rows is 1 or the batch and N one of this forward's
        token counts; any other 2-D mask is a grid (an SDXL mask at 1024x1024 pixels is a grid,
        though 1024 is also the token count of one of its levels)."""
        shape = tuple(mask.shape)
        if mask.dim() == 2:
            if shape[1] in self.levels and shape[0] in (1, self.batch):
                return mask.reshape(shape[0], *self.levels[shape[1]])
            return mask[None]  # a grid of any size: resized to each grid it meets
        grid = self.levels.get(shape[0])
        if grid is not None:
            return mask.reshape(1, *grid)
        flat = ", ".join("(%d,)" % n for n in sorted(self.levels, reverse=True))
        rows = "1" if self.batch == 1 else "1 or %d" % self.batch
        raise LoraMaskError("image mask for LoRA %r has shape %s; this forward has %s: expected %s, (%s, N) with N "
                            "one of those, or an (H, W) grid of any size (resized to %dx%d)"
                            % (name, shape, self.describe(), flat, rows, self.grid[0], self.grid[1]))

    def text_rows(self, mask: torch.Tensor, name: str) -> torch.Tensor:
        """(rows, text tokens); rows are 1 or the batch."""
        if not self.text_placeable:
            raise LoraMaskError("text mask for LoRA %r: this forward has reference latents, whose captions come "
                                "before the prompt's; text masks cannot be placed" % name)
        shape = tuple(mask.shape)
        if shape == (self.text_tokens,):
            return mask[None]
        if mask.dim() == 2 and shape[1] == self.text_tokens and shape[0] in (1, self.batch):
            return mask
        raise LoraMaskError("text mask for LoRA %r has shape %s; this forward has %s: expected (%d,) or (%d, %d)"
                            % (name, shape, self.describe(), self.text_tokens, self.batch, self.text_tokens))

    def resize(self, grid_mask: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """(rows, H, W) -> (rows, h·w) at ``size``, row-major; unchanged when it already fits."""
        rows = grid_mask.shape[0]
        if tuple(grid_mask.shape[1:]) != tuple(size):
            mode = dict(mode="bilinear", align_corners=False) if self.layout == "unet" else dict(mode="nearest-exact")
            grid_mask = F.interpolate(grid_mask[:, None], size=size, **mode)[:, 0]
        return grid_mask.reshape(rows, size[0] * size[1])

