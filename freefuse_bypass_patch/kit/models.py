"""Tiny random models of every fused-weight family, built by the running ComfyUI's own classes.

Real checkpoints are gigabytes; the bug this plugin fixes lives in the key map and in the
hooks, not in the sizes. So each family is built from ``comfy.supported_models.<Class>``
with a minimal ``unet_config`` shaped like the ones ``comfy.model_detection`` produces
(same flags, same fused layouts, tiny widths), on CPU in fp32, with random weights.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

TINY_FLUX = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=48,
                 hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2,
                 axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)

FAMILIES = ("flux", "chroma", "flux2", "sd3", "pixart", "lumina2", "zimage", "auraflow")

# Flux.1 [dev] as comfy.model_detection reads it from a checkpoint. Detection sets num_heads =
# hidden_size // sum(axes_dim), so other sizes give what it reads from a checkpoint of those sizes
# (hidden 256: 2 heads); see flux_config.
FLUX_1 = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
              hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38,
              axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
              txt_ids_dims=[])

# Released models of the families with Flux's block layout, as model detection reads them
# (Flux.1 [dev]; Chroma; FLUX.2 [klein] 4B): the dry run of a LoRA file starts from these and
# takes the sizes the file shows (kit's tiny configs are used for the other families).
RELEASED = {
    "flux": FLUX_1,
    "chroma": dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=4096, hidden_size=3072,
                   mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56],
                   theta=10000, patch_size=2, qkv_bias=True, in_dim=64, out_dim=3072, hidden_dim=5120,
                   n_layers=5, txt_ids_dims=[], vec_in_dim=None),
    "flux2": dict(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=7680,
                  hidden_size=3072, mlp_ratio=3.0, num_heads=24, depth=5, depth_single_blocks=20,
                  axes_dim=[32, 32, 32, 32], theta=2000, patch_size=1, qkv_bias=False, guidance_embed=False,
                  global_modulation=True, mlp_silu_act=True, ops_bias=False, default_ref_method="index",
                  ref_index_scale=10.0, txt_ids_dims=[3]),
}

# family -> (supported_models class, unet_config). Mostly hidden 64 with 2 heads and 2 blocks
# of each kind (exceptions noted); text features 48, pooled vectors 32. Largest: Z-Image
# 1.7M parameters, SD3 1.2M (under 7 MB in fp32); a forward takes ~10-20 ms on CPU.
_CTX = 48
_VEC = 32
_CONFIGS = {
    # Chroma (model_detection: in/out_channels 64 = 16 latent channels patchified 2x2,
    # the "distilled guidance" approximator takes 16 + 16 + 32 = 64 features and outputs
    # hidden_size modulation vectors).
    "chroma": ("Chroma", dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=_CTX,
                              hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2,
                              axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True,
                              in_dim=64, out_dim=64, hidden_dim=32, n_layers=1,
                              txt_ids_dims=[], vec_in_dim=None)),
    # Flux.2 / Klein: global modulation, gated SiLU MLP (linear1 has 3H + 2 * 3H = 9H rows),
    # no biases, patch size 1, 4 rope axes; no guidance embedder (Klein).
    "flux2": ("Flux2", dict(image_model="flux2", in_channels=16, out_channels=16, vec_in_dim=None,
                            context_in_dim=_CTX, hidden_size=64, mlp_ratio=3.0, num_heads=2, depth=2,
                            depth_single_blocks=2, axes_dim=[8, 8, 8, 8], theta=2000, patch_size=1,
                            qkv_bias=False, guidance_embed=False, global_modulation=True, mlp_silu_act=True,
                            ops_bias=False, default_ref_method="index", ref_index_scale=10.0,
                            txt_ids_dims=[3])),
    # SD3 MMDiT: hidden = 64 * depth; the last context block is "pre_only"; block 0 has the
    # SD3.5-style second self-attention (x_block.attn2.qkv); rms qk norm; 8x8 pos_embed grid.
    "sd3": ("SD3", dict(in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None,
                        adm_in_channels=_VEC, num_patches=64, pos_embed_max_size=8, qk_norm="rms",
                        pos_embed_scaling_factor=None, x_block_self_attn_layers=[0],
                        context_embedder_config={"target": "torch.nn.Linear",
                                                 "params": {"in_features": _CTX, "out_features": 128}})),
    # PixArt-alpha (micro conditions on): self-attention qkv and cross-attention kv are fused.
    # hidden_size is a multiple of 3: the size (2 values) and aspect-ratio embedders give
    # hidden // 3 features per value, added to the hidden-wide time embedding.
    "pixart": ("PixArtAlpha", dict(image_model="pixart_alpha", num_heads=3, patch_size=2, hidden_size=96,
                                   in_channels=4, depth=2, model_max_length=8, caption_channels=_CTX,
                                   micro_condition=True)),
    # Lumina 2: n_kv_heads == n_heads here because ComfyUI's key map (z_image_to_diffusers)
    # slices qkv in thirds of dim, which only holds without grouped-query attention (the
    # real Lumina 2 has 24 heads / 8 kv heads: there diffusers to_k/to_v slices overrun qkv).
    "lumina2": ("Lumina2", dict(image_model="lumina2", patch_size=2, in_channels=16, dim=64, cap_feat_dim=_CTX,
                                n_layers=2, qk_norm=True, n_heads=2, n_kv_heads=2, multiple_of=16,
                                axes_dims=[8, 12, 12], axes_lens=[300, 512, 512], rope_theta=10000.0,
                                ffn_dim_multiplier=4.0)),
    # Z-Image: Lumina2 layout with its own adaLN modulation, time scale and pad tokens. Its
    # modulation takes the 256-wide time embedding as min(dim, 256) features, so dim must be
    # >= 256: one layer and one refiner of each kind and a narrow FFN keep it small (~2M).
    "zimage": ("ZImage", dict(image_model="lumina2", patch_size=2, in_channels=16, dim=256, cap_feat_dim=_CTX,
                              n_layers=1, n_refiner_layers=1, qk_norm=True, n_heads=8, n_kv_heads=8,
                              multiple_of=16, axes_dims=[8, 12, 12], axes_lens=[1536, 512, 512],
                              rope_theta=256.0, ffn_dim_multiplier=0.25, z_image_modulation=True,
                              time_scale=1000.0, pad_tokens_multiple=32)),
    # AuraFlow: separate q/k/v (no slices); the final modulation modF.1 is a function tuple.
    "auraflow": ("AuraFlow", dict(in_channels=4, out_channels=4, patch_size=2, dim=64, n_heads=2,
                                  n_layers=2, n_double_layers=1, global_conddim=64, cond_seq_dim=_CTX,
                                  max_seq=64)),
}

# Families whose key map has slices of fused weights (AuraFlow has a function tuple only).
SLICED = frozenset(FAMILIES) - {"auraflow"}

# Every model the kit builds: the fused-weight families and SDXL (UNet, no fused weights:
# for token masks, whose layouts differ).
MODELS = FAMILIES + ("sdxl",)


def tiny_flux(seed: int = 0, device=None, dtype=None, manual_cast=None, **overrides):
    """A ModelPatcher around a random Flux built by ComfyUI's own classes (CPU, fp32 by default).

    ``dtype`` is the weight storage dtype; ``manual_cast`` the compute dtype ComfyUI casts
    weights to at forward time (as it does for fp8 checkpoints).
    """
    import comfy.supported_models

    config = dict(TINY_FLUX, **overrides)
    config.setdefault("txt_ids_dims", [])  # newer trees require it; model detection sets [] for Flux.1
    model_config = comfy.supported_models.Flux(_fit("flux", config))
    if dtype is not None:
        model_config.set_inference_dtype(dtype, manual_cast)
    return random_patcher(model_config, seed, device)


def random_patcher(model_config, seed: int = 0, device=None):
    """``model_config``'s model built on ``device``, filled by ``randomize_``, in a ModelPatcher.

    On the meta device nothing is allocated or filled: the model has every module and shape,
    enough for key maps and for what a LoRA load decides, not for a forward.
    """
    import comfy.model_patcher

    device = torch.device(device or "cpu")
    model = model_config.get_model({}, device=device)
    if device.type != "meta":
        randomize_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def flux_config(hidden_size: int = 3072, depth: int = 19, depth_single_blocks: int = 38, **overrides) -> dict:
    """A Flux.1 unet_config as comfy.model_detection gives it for a checkpoint of these sizes.

    num_heads follows detection (hidden_size // sum(axes_dim): 128 per head); ``overrides``
    replace any other field (context_in_dim, vec_in_dim, guidance_embed, ...).
    """
    return released_config("flux", hidden_size=hidden_size, depth=depth, depth_single_blocks=depth_single_blocks,
                           **overrides)


def released_config(family: str, **sizes) -> dict:
    """``RELEASED[family]`` with other sizes, kept consistent as model detection keeps it.

    num_heads = hidden_size // sum(axes_dim) unless given; a hidden size that is no multiple of
    that head size gets one head whose rope axes split it in three (only for models that are
    built, never run, at such sizes: the dry run of a LoRA of a tiny test model). Chroma's
    modulation approximator outputs hidden_size features.
    """
    config = dict(RELEASED[family], **sizes)
    hidden = config["hidden_size"]
    if "num_heads" not in sizes:
        head = sum(config["axes_dim"])
        if hidden % head:
            third = 2 * (hidden // 6)
            config["axes_dim"] = [third, third, hidden - 2 * third]
            config["num_heads"] = 1
        else:
            config["num_heads"] = hidden // head
    if family == "chroma" and "out_dim" not in sizes:
        config["out_dim"] = hidden
    return config


def build_model(family: str, unet_config: dict, seed: int = 0, device="meta"):
    """A ModelPatcher around ``family``'s model for ``unet_config`` (fields this tree's model
    does not take are left out), fp32, on ``device`` (meta by default: shapes only, see
    ``random_patcher``)."""
    import comfy.supported_models

    class_name = "Flux" if family == "flux" else _CONFIGS[family][0]
    model_config = getattr(comfy.supported_models, class_name)(_fit(family, unet_config))
    model_config.set_inference_dtype(torch.float32, None)
    return random_patcher(model_config, seed, device)


def detectable_flux_state_dict(hidden_size: int = 256, depth: int = 1, depth_single_blocks: int = 1,
                               seed: int = 0, **overrides) -> dict:
    """A random Flux.1 diffusion-model state dict that comfy.model_detection recognises.

    Written to ``models/diffusion_models`` it loads with ``UNETLoader`` as a Flux of these
    sizes (detection reads hidden_size from ``img_in``, depth by counting blocks, 2 heads at
    hidden 256 with axes_dim [16, 56, 56]). Defaults are small: text features 32, pooled
    vectors 32 (``overrides`` replace them and any other field of ``flux_config``); the
    latent has Flux's 16 channels. Needs a ComfyUI tree on the path (``use_comfyui``).
    """
    sizes = dict(dict(context_in_dim=32, vec_in_dim=32), **overrides)
    config = flux_config(hidden_size, depth, depth_single_blocks, **sizes)
    patcher = build_model("flux", config, seed=seed, device="cpu")
    return {k: v.detach().clone().contiguous() for k, v in patcher.model.diffusion_model.state_dict().items()}


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


def _config(family: str) -> dict:
    """The family's tiny unet_config, minus fields the running tree's params dataclass lacks."""
    return _fit(family, _CONFIGS[family][1])


def _fit(family: str, config: dict) -> dict:
    """``config`` minus the fields the running tree's params dataclass lacks (Flux-layout families;
    e.g. 0.3.75's Flux has no ``txt_ids_dims``)."""
    config = dict(config)
    if family in ("flux", "chroma", "flux2"):
        if family == "chroma":
            import comfy.ldm.chroma.model as module
            params = module.ChromaParams
        else:
            import comfy.ldm.flux.model as module
            params = module.FluxParams
        fields = {f.name for f in dataclasses.fields(params)}
        config = {k: v for k, v in config.items() if k in fields or k == "image_model"}
    return config


@functools.lru_cache(maxsize=None)
def available(family: str) -> bool:
    """Does the running ComfyUI have ``family``: its class exists and a tiny model builds?

    All four pinned trees (0.3.75, 0.12.1, 0.14.1, 0.28.0) build every family; a tree
    without the class, or whose constructor rejects this config, answers False.
    """
    if family not in MODELS:
        raise ValueError("unknown family %r (one of %s)" % (family, ", ".join(MODELS)))
    if family == "sdxl":
        import comfy.supported_models

        if not hasattr(comfy.supported_models, "SDXL"):
            return False
    elif family != "flux":
        import comfy.supported_models

        if not hasattr(comfy.supported_models, _CONFIGS[family][0]):
            return False
    try:
        tiny_model(family)
    except Exception:  # constructor arguments this tree does not know
        return False
    return True


def tiny_config(family: str) -> dict:
    """The unet_config of ``tiny_model(family)``."""
    if family == "sdxl":
        return dict(TINY_SDXL)
    return dict(TINY_FLUX, txt_ids_dims=[]) if family == "flux" else dict(_CONFIGS[family][1])


def tiny_model(family: str, seed: int = 0, **overrides):
    """A ModelPatcher around a random ``family`` model (CPU, fp32, 0.3M to 2.6M parameters);
    ``family`` is one of FAMILIES or "sdxl"; ``overrides`` change its unet_config (the benchmarks)."""
    if family == "flux":
        return tiny_flux(seed, **overrides)
    if family == "sdxl":
        return tiny_sdxl(seed, **overrides)
    import comfy.supported_models

    class_name, _ = _CONFIGS[family]
    model_config = getattr(comfy.supported_models, class_name)(dict(_config(family), **overrides))
    model_config.set_inference_dtype(torch.float32, None)
    return random_patcher(model_config, seed)


def tiny_inputs(family: str, seed: int = 1, image: int = 8, tokens: int = 5) -> dict:
    """x, t and the apply_model keyword arguments ``family``'s diffusion model needs."""
    if family == "flux":
        return flux_inputs(seed, image=image, tokens=tokens)
    if family == "sdxl":
        return sdxl_inputs(seed, image=image, tokens=tokens)
    if family == "pixart":
        # PixArt's sin-cos position grid divides by round(image / 64) * 64 // patch: >= 48 pixels
        image = max(image, 48)
    gen = torch.Generator().manual_seed(seed)
    channels = {"pixart": 4, "auraflow": 4}.get(family, 16)
    inputs = dict(x=torch.randn(1, channels, image, image, generator=gen), t=torch.full((1,), 0.5),
                  c_crossattn=torch.randn(1, tokens, _CTX, generator=gen))
    if family == "sd3":
        inputs["y"] = torch.randn(1, _VEC, generator=gen)  # pooled text vector
    if family == "chroma":
        inputs["guidance"] = torch.full((1,), 0.0)  # the forward needs it (fed to the approximator)
    if family in ("lumina2", "zimage"):
        inputs["num_tokens"] = tokens  # Lumina2's forward requires the caption length
    return inputs


# SDXL as comfy.model_detection describes it, at a tiny width: 64 channels on every level
# (SDXL's num_head_channels is 64: one head), one ResBlock per level, a transformer block
# at levels 1 and 2 and in the middle (as SDXL: none at full resolution), so one forward
# sees two token grids (an odd 14x18 latent: 7x9 and 4x5). adm_in_channels is what
# model_base.SDXL.encode_adm produces: the pooled text vector + 6 size embeddings of 256.
TINY_SDXL = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "num_classes": "sequential", "adm_in_channels": _VEC + 6 * 256, "in_channels": 4,
             "model_channels": 64, "num_res_blocks": [1, 1, 1], "transformer_depth": [0, 1, 1],
             "channel_mult": [1, 1, 1], "transformer_depth_middle": 1, "use_linear_in_transformer": True,
             "context_dim": _CTX, "num_head_channels": 64, "transformer_depth_output": [0, 0, 1, 1, 1, 1],
             "use_temporal_attention": False, "use_temporal_resblock": False}


def tiny_sdxl(seed: int = 0, device=None, **overrides):
    """A ModelPatcher around a random SDXL UNet built by ``comfy.supported_models.SDXL``
    (CPU, fp32, 2.6M parameters); ``overrides`` change the unet_config."""
    import comfy.supported_models

    model_config = comfy.supported_models.SDXL(dict(TINY_SDXL, **overrides))
    model_config.set_inference_dtype(torch.float32, None)
    return random_patcher(model_config, seed, device)


def sdxl_inputs(seed: int = 1, image=8, tokens: int = 5, batch: int = 1, config=None, device=None,
                dtype=torch.float32) -> dict:
    """A 4-channel latent of ``image`` (an int or (height, width)), ``tokens`` text tokens and
    the ``y`` vector (pooled text + size embeddings) the tiny SDXL takes."""
    config = config or TINY_SDXL
    height, width = (image, image) if isinstance(image, int) else image
    gen = torch.Generator().manual_seed(seed)
    tensors = dict(x=torch.randn(batch, config["in_channels"], height, width, generator=gen),
                   t=torch.full((batch,), 0.5),
                   c_crossattn=torch.randn(batch, tokens, config["context_dim"], generator=gen),
                   y=torch.randn(batch, config["adm_in_channels"], generator=gen))
    return {k: v.to(device=device or "cpu", dtype=dtype) for k, v in tensors.items()}
