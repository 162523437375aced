"""Bypass on a GGUF model (city96's ComfyUI-GGUF), measured side by side in one process.

    python benchmarks/gguf_overhead.py [--comfyui PATH] [--quant mixed|Q8_0|Q4_K] [--rounds N]

A Flux built by ComfyUI's classes (CPU, fp32 compute, hidden 512, 2 + 4 blocks) is written
as GGUF and loaded by the node's own ``UnetLoaderGGUF``; LoRAs target its attention and MLP
linears. Modes: base; merged (ComfyUI-GGUF keeps the LoRA as patches on each quantized
weight and applies them at every dequantization); stock bypass with a kohya LoRA (the one
stock case that applies); the plugin with the same kohya LoRA, a diffusers LoRA (fused q/k/v
slices, which stock drops) and a DoRA. Prints the median ms per forward, its spread, the ratio
to merged and each mode's max|out - merged| / max|merged| against its own merged reference.
ComfyUI-GGUF comes from $COMFYUI_GGUF_PATH or ../shared/custom_nodes/ComfyUI-GGUF.
"""

import argparse
import math
import os
import re
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODEL = dict(hidden_size=512, num_heads=4, depth=2, depth_single_blocks=4, context_in_dim=512, vec_in_dim=768,
             axes_dim=[16, 56, 56])
ATTN_MLP = re.compile(r"\.(img_attn\.qkv|img_attn\.proj|txt_attn\.qkv|txt_attn\.proj|img_mlp\.\d|txt_mlp\.\d|linear1|linear2)\.weight$")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--comfyui", help="ComfyUI tree (default: as for `python -m freefuse_bypass_patch check`)")
    parser.add_argument("--quant", default="mixed", choices=["mixed", "Q8_0", "Q4_K"],
                        help="block linears' GGUF type (mixed: Q8_0 in block 0, Q4_K in block 1)")
    parser.add_argument("--rounds", type=int, default=6, help="passes over all modes, in a shuffled order each")
    parser.add_argument("--iters", type=int, default=2, help="timed forwards per mode and pass")
    parser.add_argument("--image", type=int, default=32, help="latent size (tokens = (image / 2)^2)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from freefuse_bypass_patch import kit as sc

    sc.use_comfyui(args.comfyui or sc.default_comfyui())
    torch.set_num_threads(args.threads)
    sc.quiet_logging()
    import comfy.model_management as mm
    import comfy.sd

    import freefuse_bypass_patch as ffbp
    from freefuse_bypass_patch.kit import gguf as kg
    from freefuse_bypass_patch.patching import comfyui_version

    source = kg.node_source()
    if source is None:
        sys.exit("ComfyUI-GGUF not found: set %s" % kg.NODE_ENV)
    t0 = time.time()
    node = kg.load_node(source)
    quant = kg.mixed_quants if args.quant == "mixed" else _uniform(args.quant)
    quantized, reference, kinds = kg.gguf_flux(node, tempfile.mkdtemp(prefix="ffbp_bench_"), quant=quant, **MODEL)
    del reference
    config = dict(kg.GGUF_FLUX, **MODEL)
    inputs = sc.flux_inputs(image=args.image, tokens=128, config=config)
    model = quantized.model
    lora = dict(rank=args.rank, alpha=args.rank, scale=0.02, include=ATTN_MLP.search)
    kohya = sc.make_lora(model, "kohya", seed=1, **lora)
    diffusers = sc.make_lora(model, "diffusers", seed=2, **lora)
    dora = sc.make_lora(model, "kohya", seed=3, **lora)
    gen = torch.Generator().manual_seed(4)
    for up in [k for k in dora if k.endswith(".lora_up.weight")]:  # DoRA: a magnitude per output row
        dora[up.replace(".lora_up.weight", ".dora_scale")] = 1 + 0.05 * torch.randn(dora[up].shape[0], 1, generator=gen)
    counts = {k: sum(1 for v in kinds.values() if v == k) for k in sorted(set(kinds.values()))}
    print("ComfyUI %s | ComfyUI-GGUF %s | %s | %d image + 128 text tokens | rank %d, attention+MLP | setup %.0fs"
          % (comfyui_version(), ", ".join("%s %d" % kv for kv in counts.items()),
             "%.1fM params" % (sum(math.prod(p.shape) for p in model.diffusion_model.parameters()) / 1e6),
             (args.image // 2) ** 2, args.rank, time.time() - t0), flush=True)

    bypass, merged = comfy.sd.load_bypass_lora_for_models, comfy.sd.load_lora_for_models
    modes, references = {"base": quantized}, {}
    for name, sd in (("kohya", kohya), ("diffusers", diffusers), ("DoRA", dora)):
        modes["merged, %s" % name] = references[name] = merged(quantized, None, sd, 1.0, 0)[0]
    ffbp.uninstall()
    modes["stock bypass, kohya"] = bypass(quantized, None, kohya, 1.0, 0)[0]
    ffbp.install()
    for name, sd in (("kohya", kohya), ("diffusers", diffusers), ("DoRA", dora)):
        modes["plugin, %s" % name] = bypass(quantized, None, sd, 1.0, 0)[0]

    outputs = {}
    with torch.inference_mode():
        for name, patcher in modes.items():
            mm.load_models_gpu([patcher])
            outputs[name] = sc.apply_model(patcher, inputs).clone()  # also the warm-up
            mm.unload_all_models()
        times = sc.time_interleaved(modes, inputs, args.rounds, args.iters)

    width = max(len(name) for name in modes)
    print("\n%-*s %10s %7s %16s %16s" % (width, "mode", "median ms", "IQR %", "x merged (same)", "rel diff vs merged"))
    for name in modes:
        lora_name = name.split(", ")[-1] if ", " in name else None
        ref_name = "merged, %s" % lora_name if lora_name else None
        med = statistics.median(times[name])
        q1, _, q3 = statistics.quantiles(times[name], n=4)
        ratio = "%.3f" % (med / statistics.median(times[ref_name])) if ref_name else "-"
        diff = "%.2e" % sc.max_rel_diff(outputs[name], outputs[ref_name]) if ref_name and ref_name != name else "-"
        print("%-*s %10.2f %7.1f %16s %16s" % (width, name, med * 1e3, 100 * (q3 - q1) / med, ratio, diff))


def _uniform(qtype):
    def quant(key, shape):
        if len(shape) == 2 and key.endswith(".weight") and key.startswith(("double_blocks.", "single_blocks.")):
            return qtype
        return "F32"
    return quant


if __name__ == "__main__":
    main()
