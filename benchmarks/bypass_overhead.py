"""Bypass LoRA overhead, measured side by side in one process on a Flux built by ComfyUI.

    python benchmarks/bypass_overhead.py [--comfyui PATH] [--config small|dev|dev512] [--rounds N] [--masks]
                                         [--model flux,sdxl,zimage]

Modes: base; merged LoRA (the reference); ComfyUI's stock bypass with a kohya LoRA (one
hook per module, the one stock case that works); this plugin with 1, 2 and 3 chained
diffusers LoRAs; and a naive per-adapter hook (zeros_like(output) per adapter, then a
slice add, as FreeFuse's private loader does) with 1 and 3 LoRAs. Prints the median ms per
diffusion-model forward, its spread, the ratio to merged, the extra peak memory per forward
(CUDA), and the time to attach a LoRA (loader call + ComfyUI load) for merged vs bypass.
Beside the median it prints the fastest forward of each mode: on a CPU shared with other
work the median swings by several per cent between runs, the minimum much less.
With ``--masks``: two chained LoRAs with complementary left/right token masks (the plugin,
masked in rank space; and a naive per-adapter hook that multiplies its full-size delta by
the mask), against merged with the same two LoRAs, and the issue's targets for that ratio.

It also prints the memory-traffic floor of any bypass done by a forward hook: the hook
sees the finished output, so it must read and write every hooked output once more and
read every hooked input once. Those bytes, at the bandwidth measured here with an in-place
add, are a lower bound on the hook's cost that no grouping or kernel choice can remove.

Configs: ``small`` is the CPU target (fp32, one thread); ``dev`` is the Flux.1-dev
architecture at 1024x1024 (4096 image + 512 text tokens, bf16, rank 32) and ``dev512`` at
512x512, for a GPU.

``--model`` (a comma-separated list, run one after the other in this process) adds SDXL
and Z-Image at a CPU ``small`` shape (their layouts, narrower and shallower): base, merged
and the plugin with 1 and 2 LoRAs on the attention and MLP linears, and with ``--masks`` the
plugin with two masked LoRAs (SDXL: masks resized to each transformer level); the stock and
naive-hook modes are Flux's only. A closing line gives masked / merged for every model.
"""

import argparse
import os
import random
import re
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIGS = {
    "small": dict(model=dict(hidden_size=512, num_heads=8, depth=2, depth_single_blocks=4, context_in_dim=512,
                             vec_in_dim=768, axes_dim=[16, 24, 24]),
                  image=64, tokens=128, rank=16, dtype=torch.float32, device="cpu"),
    "dev": dict(model=dict(hidden_size=3072, num_heads=24, depth=19, depth_single_blocks=38, context_in_dim=4096,
                           vec_in_dim=768, axes_dim=[16, 56, 56]),
                image=128, tokens=512, rank=32, dtype=torch.bfloat16, device="cuda"),
}
CONFIGS["dev512"] = dict(CONFIGS["dev"], image=64)

# The other models (issue 15), CPU only: kit overrides, latent side, text tokens, LoRA rank.
# SDXL: 128 channels, transformers at levels 1 and 2 (1 and 3 blocks), a 48x48 latent
# (576 and 144 image tokens); Z-Image: dim 512, 4 layers, its 8/3 MLP, 24x24 tokens + 128 caption.
# Ranks keep rank / width at 1/32, as the Flux small config (16 on 512).
MODEL_CONFIGS = {
    "sdxl": dict(model=dict(model_channels=128, channel_mult=[1, 2, 2], num_res_blocks=[2, 2, 2],
                            transformer_depth=[0, 0, 1, 1, 3, 3], transformer_depth_middle=3,
                            transformer_depth_output=[0, 0, 0, 1, 1, 1, 3, 3, 3], context_dim=256,
                            adm_in_channels=256 + 6 * 256),
                 image=48, tokens=77, rank=8, dtype=torch.float32, device="cpu"),
    "zimage": dict(model=dict(dim=512, n_layers=4, n_refiner_layers=1, n_heads=8, n_kv_heads=8, cap_feat_dim=512,
                              ffn_dim_multiplier=8.0 / 3.0, axes_dims=[16, 24, 24]),
                   image=48, tokens=128, rank=16, dtype=torch.float32, device="cpu"),
}

# Issue 10's targets for "plugin, 2 LoRAs, masked" / "merged, 2 LoRAs".
MASK_TARGETS = {"small": 1.12, "dev": 1.10}

# What a typical trainer (ai-toolkit, kohya defaults) targets on Flux: attention and MLP
# linears of every block; 131M parameters at rank 32 on Flux.1-dev, 228 hooked modules.
ATTN_MLP = re.compile(r"\.(img_attn\.qkv|img_attn\.proj|txt_attn\.qkv|txt_attn\.proj|img_mlp\.\d|txt_mlp\.\d|linear1|linear2)\.weight$")
# The same for SDXL (every transformer block's attention and feed-forward) and Z-Image (layers and refiners).
MODEL_ATTN_MLP = {
    "sdxl": re.compile(r"\.transformer_blocks\.\d+\.(attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2))\.weight$"),
    "zimage": re.compile(r"\.(layers|noise_refiner|context_refiner)\.\d+\.(attention\.(qkv|out)|feed_forward\.w[123])"
                         r"\.weight$"),
}


class NaiveHooks:
    """The comparison: one forward hook per adapter, each allocating a full-size zero delta.

    With ``mask`` ((N_img,)), the delta of modules that see image tokens is multiplied by it
    per token (text tokens of the single blocks by one), as FreeFuse's private loader does.
    """

    def __init__(self, model, loaded, strength, device, dtype, mask=None, text_tokens=0):
        from freefuse_bypass_patch.layouts import module_role

        self.entries = []
        for key, adapter in loaded.items():
            weight_key, offset = (key, None) if isinstance(key, str) else (key[0], key[1])
            up, down, alpha = adapter.weights[0], adapter.weights[1], adapter.weights[2]
            scale = strength * (alpha / down.shape[0] if alpha is not None else 1.0)
            path = weight_key[: -len(".weight")]
            module = model.get_submodule(path)
            role = module_role(path.replace("diffusion_model.", "", 1), "flux") if mask is not None else None
            token_mask = None
            if role in ("image", "joint"):  # the text side is not masked
                before = text_tokens if role == "joint" else 0
                token_mask = mask.to(device, dtype)
                token_mask = torch.cat([token_mask.new_ones(before), token_mask])[None, :, None]
            self.entries.append((module, up.to(device, dtype), down.to(device, dtype), scale, offset, token_mask))
        self.handles = []

    def inject(self, patcher=None):
        for module, up, down, scale, offset, token_mask in self.entries:
            self.handles.append(module.register_forward_hook(self._make(up, down, scale, offset, token_mask)))

    def eject(self, patcher=None):
        for h in self.handles:
            h.remove()
        self.handles = []

    @staticmethod
    def _make(up, down, scale, offset, token_mask=None):
        def hook(module, args, out):
            h = F.linear(F.linear(args[0], down), up) * scale
            delta = torch.zeros_like(out)
            if offset is None:
                delta += h
            else:
                delta[..., offset[1]:offset[1] + offset[2]] = h
            if token_mask is not None:
                delta = delta * token_mask
            return out + delta
        return hook


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--comfyui", help="ComfyUI tree (default: as for `python -m freefuse_bypass_patch check`)")
    parser.add_argument("--config", default="small", choices=sorted(CONFIGS))
    parser.add_argument("--model", default="flux",
                        help="comma-separated: flux, sdxl, zimage (sdxl and zimage: the CPU small shape only)")
    parser.add_argument("--rounds", type=int, default=8, help="passes over all modes, in a shuffled order each")
    parser.add_argument("--iters", type=int, default=2, help="timed forwards per mode and pass")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="override the config's dtype")
    parser.add_argument("--targets", choices=["attn_mlp", "all"], default="attn_mlp",
                        help="LoRA targets: attention+MLP linears (default) or every layer the key map reaches")
    parser.add_argument("--layout", choices=["auto", "block", "sliced"], default="auto",
                        help="plugin's up-projection layout (hooks.LAYOUTS; block-diagonal only where it holds <= 2x the factors)")
    parser.add_argument("--modes", help="comma-separated substrings: time only the modes that contain one "
                        "(merged, the reference, always runs), e.g. 'plugin,stock'")
    parser.add_argument("--masks", action="store_true",
                        help="also two LoRAs with complementary left/right token masks (plugin and naive hook) "
                        "against merged with two LoRAs")
    parser.add_argument("--profile", action="store_true",
                        help="also print the top kernels of one forward of merged, stock bypass and plugin")
    args = parser.parse_args()
    families = [m.strip() for m in args.model.split(",") if m.strip()]
    for family in families:
        if family not in ("flux",) + tuple(MODEL_CONFIGS):
            parser.error("unknown model %r (flux, %s)" % (family, ", ".join(MODEL_CONFIGS)))
        if family != "flux" and args.config != "small":
            parser.error("--model %s has only the CPU small config" % family)
    device = torch.device(CONFIGS[args.config]["device"])

    from freefuse_bypass_patch import kit as sc

    sc.use_comfyui(args.comfyui or sc.default_comfyui(), cpu=device.type == "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    ratios = {family: run(family, args) for family in families}
    if args.masks and len(families) > 1:
        target = MASK_TARGETS.get(args.config)
        print("\nmasked / merged with 2 LoRAs (target <= %sx), median (fastest forwards): %s" % (
            target, ", ".join("%s %.3fx (%.3fx)" % ((family,) + ratio) for family, ratio in ratios.items())))


def setup(family, cfg, device, dtype, include):
    """(base patcher, inputs, three diffusers LoRAs, a kohya LoRA or None, mask grid, a description)."""
    from freefuse_bypass_patch import kit as sc

    if family == "flux":
        base = sc.tiny_flux(0, device=device, dtype=dtype, **cfg["model"])
        config = dict(sc.TINY_FLUX, **cfg["model"])
        inputs = sc.flux_inputs(image=cfg["image"], tokens=cfg["tokens"], config=config, device=device, dtype=dtype)
        loras = [sc.make_lora(base.model, "diffusers", rank=cfg["rank"], seed=s, alpha=cfg["rank"], scale=0.02,
                              include=include) for s in (1, 2, 3)]
        kohya = sc.make_lora(base.model, "kohya", rank=cfg["rank"], seed=4, alpha=cfg["rank"], scale=0.02,
                             include=include)
        grid = (cfg["image"] // 2,) * 2
        return base, inputs, loras, kohya, grid, "%d image + %d text tokens" % (grid[0] * grid[1], cfg["tokens"])
    base = sc.tiny_model(family, 0, **cfg["model"])
    if family == "sdxl":
        config = dict(sc.TINY_SDXL, **cfg["model"])
        inputs = sc.sdxl_inputs(image=cfg["image"], tokens=cfg["tokens"], config=config, device=device, dtype=dtype)
        grid = (cfg["image"],) * 2  # the latent grid; masks resized to each transformer level
        levels = sorted(set(_spatial_inputs(base, inputs)), reverse=True)
        describe = "transformers at %s tokens, %d text tokens" % (
            " and ".join("%dx%d" % hw for hw in levels), cfg["tokens"])
    else:
        gen = torch.Generator().manual_seed(1)
        dim = cfg["model"]["cap_feat_dim"]
        inputs = dict(x=torch.randn(1, 16, cfg["image"], cfg["image"], generator=gen), t=torch.full((1,), 0.5),
                      c_crossattn=torch.randn(1, cfg["tokens"], dim, generator=gen), num_tokens=cfg["tokens"])
        inputs = {k: v.to(device, dtype) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        grid = (cfg["image"] // 2,) * 2
        describe = "%d image + %d caption tokens" % (grid[0] * grid[1], cfg["tokens"])
    loras = [sc.family_lora(base.model, family, seed=s, rank=cfg["rank"], scale=0.02, alpha=cfg["rank"],
                            include=include) for s in (1, 2)]
    return base, inputs, loras, None, grid, describe


def _spatial_inputs(base, inputs):
    """The (h, w) of every SpatialTransformer's input in one forward of an SDXL."""
    seen = []
    _one_forward_watched(base, inputs, lambda model: [
        m.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
        for m in model.modules() if type(m).__name__ == "SpatialTransformer"])
    return seen


def _one_forward_watched(patcher, inputs, watch):
    """Load ``patcher``, let ``watch(diffusion model)`` register its torch hooks (after the load,
    so the plugin's own hooks are attached), run one forward, then remove them and unload."""
    import comfy.model_management as mm

    from freefuse_bypass_patch import kit as sc

    mm.load_models_gpu([patcher])
    handles = watch(patcher.model.diffusion_model)
    try:
        with torch.inference_mode():
            sc.apply_model(patcher, inputs)
    finally:
        for h in handles:
            h.remove()
        mm.unload_all_models()


def run(family, args):
    """Every mode of ``family``, timed side by side; returns masked / merged with 2 LoRAs, by the
    median and by the fastest forwards (or None without --masks)."""
    import comfy.lora
    import comfy.model_management as mm
    import comfy.sd
    from comfy.patcher_extension import PatcherInjection

    import freefuse_bypass_patch as ffbp
    from freefuse_bypass_patch import kit as sc
    from freefuse_bypass_patch.patching import comfyui_version

    cfg = CONFIGS[args.config] if family == "flux" else MODEL_CONFIGS[family]
    device = torch.device(cfg["device"])
    dtype = getattr(torch, args.dtype) if args.dtype else cfg["dtype"]
    pattern = ATTN_MLP if family == "flux" else MODEL_ATTN_MLP[family]
    include = pattern.search if args.targets == "attn_mlp" else None
    t0 = time.time()
    base, inputs, loras, kohya, grid, describe = setup(family, cfg, device, dtype, include)
    model = base.model
    n_params = sum(p.numel() for p in model.diffusion_model.parameters())
    n_lora = sum(v.numel() for k, v in loras[0].items() if not k.endswith(".alpha"))
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    n_modules = len(comfy.lora.load_lora(dict(loras[0]), key_map))
    print("\nComfyUI %s | %s, config %s | %s %s | model %.1fM params | LoRA %.2fM params, rank %d, %s, %d adapters | "
          "%s | layout %s | setup %.0fs"
          % (comfyui_version(), family, args.config, device, str(dtype).replace("torch.", ""), n_params / 1e6,
             n_lora / 1e6, cfg["rank"], args.targets, n_modules, describe, args.layout, time.time() - t0), flush=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def attach(make):
        sync()
        start = time.perf_counter()
        patcher = make()
        mm.load_models_gpu([patcher])
        sync()
        elapsed = time.perf_counter() - start
        mm.unload_all_models()
        return patcher, elapsed

    left = torch.zeros(grid, device=device)
    left[:, : grid[1] // 2] = 1.0
    half_masks = [left.flatten(), 1.0 - left.flatten()] if family == "flux" else [left, 1.0 - left]

    def naive(n, masked=False):
        patcher = base.clone()
        injections = []
        for i, sd in enumerate(loras[:n]):
            hooks = NaiveHooks(model, comfy.lora.load_lora(dict(sd), key_map), 1.0, device, dtype,
                               mask=half_masks[i] if masked else None, text_tokens=cfg["tokens"])
            injections.append(PatcherInjection(inject=hooks.inject, eject=hooks.eject))
        patcher.set_injections("naive", injections)
        return patcher

    bypass = comfy.sd.load_bypass_lora_for_models
    merged = comfy.sd.load_lora_for_models
    attach_times = {}
    modes = {"base": base}
    modes["merged, 1 LoRA"], attach_times["merged"] = attach(lambda: merged(base, None, loras[0], 1.0, 0)[0])
    if family == "flux":
        modes["merged, 3 LoRAs"], _ = attach(lambda: sc.chain(merged, base, [(l, 1.0) for l in loras]))
        ffbp.uninstall()
        modes["stock bypass, kohya"], attach_times["stock bypass (kohya)"] = attach(
            lambda: bypass(base, None, kohya, 1.0, 0)[0])
        ffbp.install()
    def plugin(chained):  # through the patched loader, then (--layout) the hooks rebuilt with that layout
        patcher = sc.chain(bypass, base, [(l, 1.0) for l in chained])
        return patcher if args.layout == "auto" else sc.with_layout(patcher, args.layout)

    modes["plugin, 1 LoRA"], attach_times["plugin bypass"] = attach(lambda: plugin(loras[:1]))
    modes["plugin, 2 LoRAs"], _ = attach(lambda: plugin(loras[:2]))
    if family == "flux":
        modes["plugin, 3 LoRAs"], _ = attach(lambda: plugin(loras))
        modes["naive hook, 1 LoRA"], _ = attach(lambda: naive(1))
        modes["naive hook, 3 LoRAs"], _ = attach(lambda: naive(3))
    if args.masks:
        modes["merged, 2 LoRAs"], _ = attach(lambda: sc.chain(merged, base, [(l, 1.0) for l in loras[:2]]))
        modes["plugin, 2 LoRAs, masked"], _ = attach(lambda: ffbp.with_lora_masks(
            plugin(loras[:2]), {0: half_masks[0], 1: half_masks[1]}))
        if family == "flux":
            modes["naive masked hook, 2 LoRAs"], _ = attach(lambda: naive(2, masked=True))
    floor_bytes = hook_traffic(modes["plugin, 1 LoRA"], inputs)
    if args.modes:
        wanted = [w.strip() for w in args.modes.split(",") if w.strip()]
        references = ("merged, 1 LoRA", "merged, 2 LoRAs")
        modes = {k: v for k, v in modes.items() if k in references or any(w in k for w in wanted)}

    times = {name: [] for name in modes}
    peaks = {name: [] for name in modes}
    with torch.inference_mode():
        order = list(modes)
        rng = random.Random(0)
        for _ in range(args.rounds):
            rng.shuffle(order)  # no mode always runs right after another
            for name in order:
                patcher = modes[name]
                mm.load_models_gpu([patcher])
                sc.apply_model(patcher, inputs)  # warm-up (and factor caches)
                for _ in range(args.iters):
                    sync()
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                        before = torch.cuda.memory_allocated()
                    start = time.perf_counter()
                    sc.apply_model(patcher, inputs)
                    sync()
                    times[name].append(time.perf_counter() - start)
                    if device.type == "cuda":
                        peaks[name].append(torch.cuda.max_memory_allocated() - before)
                mm.unload_all_models()

    ref = statistics.median(times["merged, 1 LoRA"])
    base_peak = max(peaks["base"]) if peaks.get("base") else 0
    width = max([22] + [len(name) for name in modes])
    best_ref = min(times["merged, 1 LoRA"])
    print("\n%-*s %10s %9s %10s %10s %10s %16s" % (width, "mode", "median ms", "IQR %", "x merged", "min ms",
                                                  "x merged", "extra peak MiB"))
    for name in modes:
        med = statistics.median(times[name])
        q1, _, q3 = statistics.quantiles(times[name], n=4) if len(times[name]) > 1 else (med, med, med)
        extra = "%.1f" % ((max(peaks[name]) - base_peak) / 2**20) if peaks[name] else "n/a (cpu)"
        print("%-*s %10.2f %9.1f %10.3f %10.2f %10.3f %16s" % (width, name, med * 1e3, 100 * (q3 - q1) / med,
                                                               med / ref, min(times[name]) * 1e3,
                                                               min(times[name]) / best_ref, extra))
    if "naive hook, 3 LoRAs" in times and "plugin, 3 LoRAs" in times:
        naive3, plugin3 = statistics.median(times["naive hook, 3 LoRAs"]), statistics.median(times["plugin, 3 LoRAs"])
        print("\nnaive hook / plugin with 3 LoRAs: %.2fx" % (naive3 / plugin3))
    ratio = None
    if "plugin, 2 LoRAs, masked" in times:
        ratio = statistics.median(times["plugin, 2 LoRAs, masked"]) / statistics.median(times["merged, 2 LoRAs"])
        best = min(times["plugin, 2 LoRAs, masked"]) / min(times["merged, 2 LoRAs"])
        target = MASK_TARGETS.get(args.config)
        verdict = ("target <= %.2fx: %s" % (target, "PASS" if ratio <= target else "MISS")) if target else \
            "no target for this config"
        print("masked / merged with 2 LoRAs (%s): %.3fx (%s); fastest forwards: %.3fx" % (family, ratio, verdict, best))
        ratio = (ratio, best)
    bandwidth = measured_bandwidth(device, dtype)
    floor = floor_bytes / bandwidth
    print("forward-hook traffic floor (1 LoRA): %.2f GB per forward (hooked outputs read + written, inputs read)"
          " at %.0f GB/s measured (in-place add) = %.2f ms = %.3f x merged at best"
          % (floor_bytes / 1e9, bandwidth / 1e9, floor * 1e3, 1 + floor / ref))
    if args.profile:
        _profile({k: modes[k] for k in ("merged, 1 LoRA", "stock bypass, kohya", "plugin, 1 LoRA") if k in modes},
                 inputs, mm)
    print("attach one LoRA (loader + ComfyUI load): " + ", ".join("%s %.0f ms" % (k, v * 1e3) for k, v in attach_times.items()))
    return ratio


def hook_traffic(patcher, inputs):
    """Bytes a forward hook must move beyond the base forward, for the modules the plugin hooks.

    Each hooked output is read and written once more (the in-place add of the adapters)
    and each hooked input is read once more (the down-projection): one forward, counted.
    """
    from freefuse_bypass_patch.hooks import ACTIVE_HOOK_ATTR

    total = [0]

    def count(module, args, out):
        total[0] += 2 * out.numel() * out.element_size() + args[0].numel() * args[0].element_size()

    _one_forward_watched(patcher, inputs, lambda model: [
        m.register_forward_hook(count) for m in model.modules() if ACTIVE_HOOK_ATTR in m.__dict__])
    return total[0]


def measured_bandwidth(device, dtype, nbytes=1 << 30):
    """Bytes per second of an in-place add (read + write) over a buffer larger than the caches."""
    if device.type == "cpu":
        nbytes = 1 << 28
    buf = torch.zeros(nbytes // torch.empty((), dtype=dtype).element_size(), device=device, dtype=dtype)
    best = float("inf")
    for _ in range(6):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        buf.add_(1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    del buf
    return 2 * nbytes / best


def _profile(modes, inputs, mm):
    from torch.profiler import ProfilerActivity, profile

    from freefuse_bypass_patch import kit as sc

    x = inputs["x"]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    sort = "cuda_time_total" if x.is_cuda else "cpu_time_total"
    for name, patcher in modes.items():
        mm.load_models_gpu([patcher])
        with torch.inference_mode():
            sc.apply_model(patcher, inputs)
            with profile(activities=activities) as prof:
                sc.apply_model(patcher, inputs)
                if x.is_cuda:
                    torch.cuda.synchronize()
        mm.unload_all_models()
        events = prof.key_averages()
        print("\n--- profile: %s (%d kernel/op kinds)" % (name, len(events)))
        print(events.table(sort_by=sort, row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main()
