"""Bypass on an INT8 Wan 2.1 (ComfyUI 0.30+'s ``linear_input_act``), measured side by side in one process.

    python benchmarks/int8_overhead.py [--comfyui PATH] [--int8 ffn.2,...] [--rounds N]

A Wan 2.1 t2v built by ComfyUI's classes (CPU, fp32 compute, dim 512, ffn 2048, 4 blocks) is
written as a checkpoint whose ``ffn.2`` layers (``--int8``: other block Linears too) are INT8
tensor-wise with ``comfy_quant`` metadata and loaded by ``comfy.sd.load_diffusion_model``; a
kohya LoRA targets every block Linear. Modes: base; merged (ComfyUI re-quantizes W+ΔW into
INT8 at load); stock bypass (the plugin uninstalled: the ffn.2 adapters are lost, as
``linear_input_act`` never calls the module); the plugin. Prints the median ms per forward,
its spread, the ratios to base and to merged, the ``comfy_kitchen.int8_linear`` calls per
forward (the plugin keeps the INT8 kernel for the base) and max|out - merged| / max|merged|,
beside merged's own INT8 rounding (merged fully loaded vs under lowvram).
Needs a ComfyUI that has ``comfy.ops.linear_input_act`` (0.30+).
"""

import argparse
import math
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODEL = dict(dim=512, ffn_dim=2048, num_layers=4, num_heads=4, text_dim=64)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--comfyui", help="ComfyUI tree (default: as for `python -m freefuse_bypass_patch check`)")
    parser.add_argument("--int8", default="ffn.2", help="block Linears stored as INT8, comma-separated name endings")
    parser.add_argument("--rounds", type=int, default=6, help="passes over all modes, in a shuffled order each")
    parser.add_argument("--iters", type=int, default=2, help="timed forwards per mode and pass")
    parser.add_argument("--image", type=int, default=32, help="latent size (tokens = frames * (image / 2)^2)")
    parser.add_argument("--frames", type=int, default=2)
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
    from freefuse_bypass_patch.kit import int8 as k8
    from freefuse_bypass_patch.patching import comfyui_version

    if not k8.has_input_act_linear():
        sys.exit("ComfyUI %s has no comfy.ops.linear_input_act (0.30+): nothing to measure" % comfyui_version())
    t0 = time.time()
    sd, metadata = k8.wan_checkpoint(seed=0, int8=tuple(args.int8.split(",")), **MODEL)
    path = k8.save_checkpoint(sd, metadata, os.path.join(tempfile.mkdtemp(prefix="ffbp_bench_"), "wan.safetensors"))
    del sd
    base = k8.load_wan(path)
    config = k8.wan_config(**MODEL)
    inputs = k8.wan_inputs(frames=args.frames, image=args.image, tokens=64, config=config)
    targets = [t for t in sc.lora_targets(base.model, "kohya") if t[0].startswith("lora_unet_blocks_")]
    lora = sc.random_lora(targets, "kohya", args.rank, seed=1, scale=0.02, alpha=args.rank)
    int8 = k8.int8_modules(base)
    print("ComfyUI %s | Wan 2.1 dim %d, ffn %d, %d blocks, %.1fM params | INT8: %d layers (%s) | %d tokens | "
          "rank %d on %d block Linears | %d thread(s) | setup %.0fs"
          % (comfyui_version(), config["dim"], config["ffn_dim"], config["num_layers"],
             sum(math.prod(p.shape) for p in base.model.diffusion_model.parameters()) / 1e6, len(int8), args.int8,
             args.frames * (args.image // 2) ** 2, args.rank, len(targets), args.threads, time.time() - t0),
          flush=True)

    modes = {"base": base, "merged": comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0)[0]}
    ffbp.uninstall()
    modes["stock bypass"] = comfy.sd.load_bypass_lora_for_models(base, None, lora, 1.0, 0)[0]
    ffbp.install()
    modes["plugin"] = comfy.sd.load_bypass_lora_for_models(base, None, lora, 1.0, 0)[0]

    outputs, kernel = {}, {}
    with torch.no_grad():  # not inference_mode: ComfyUI re-quantizing a merged INT8 weight at load fails under it
        for name, patcher in modes.items():
            mm.load_models_gpu([patcher])
            with k8.counting_int8_linear() as calls:
                outputs[name] = sc.apply_model(patcher, inputs).clone()  # also the warm-up
            kernel[name] = calls[0]
            mm.unload_all_models()
        times = sc.time_interleaved(modes, inputs, args.rounds, args.iters)

    merged = modes["merged"]  # merged's own INT8 rounding: patches applied at cast time (lowvram) instead
    merged.patch_model(torch.device("cpu"), lowvram_model_memory=64 * 1024)
    try:
        with torch.no_grad():
            rounding = sc.max_rel_diff(sc.apply_model(merged, inputs), outputs["merged"])
    finally:
        merged.unpatch_model()
    width = max(len(name) for name in modes)
    print("\n%-*s %10s %7s %8s %10s %12s %18s" % (width, "mode", "median ms", "IQR %", "x base", "x merged",
                                                  "int8_linear", "rel diff vs merged"))
    base_ms, merged_ms = statistics.median(times["base"]), statistics.median(times["merged"])
    for name in modes:
        med = statistics.median(times[name])
        q1, _, q3 = statistics.quantiles(times[name], n=4)
        diff = "-" if name == "merged" else "%.2e" % sc.max_rel_diff(outputs[name], outputs["merged"])
        print("%-*s %10.2f %7.1f %8.3f %10.3f %12d %18s" % (width, name, med * 1e3, 100 * (q3 - q1) / med,
                                                           med / base_ms, med / merged_ms, kernel[name], diff))
    print("\nmerged's own INT8 rounding (merged fully loaded vs under lowvram, patched at cast time): %.2e" % rounding)


if __name__ == "__main__":
    main()
