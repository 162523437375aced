"""Load cost of a bypass LoRA: the plugin's loader against stock ComfyUI's, side by side.

    python benchmarks/load_overhead.py [--comfyui PATH] [--rank 16] [--rounds 7]

A Flux at real width (hidden 3072; 2 double and 2 single blocks) built on the meta device, as
the dry run builds it: shapes only, so only what the loaders themselves allocate is measured.
Three bf16 LoRAs on it: diffusers names (fused q/k/v and mlp slices: stock drops those),
LyCORIS LoKr and OFT with alpha > 0 (kohya names, whole weights: stock applies them). For each,
in one process and alternating stock and plugin, the median load time per adapter over
``--rounds`` loads, their ratio (target: plugin <= 1.5x stock), and the largest CPU tensor each
load creates, against the largest adapted weight (target: <= 0.1x).
"""

import argparse
import logging
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from freefuse_bypass_patch import kit  # noqa: E402


def loras(model, rank: int):
    """name -> (state dict, largest adapted weight in fp32 bytes)."""
    import comfy.utils

    def largest(sd):
        import comfy.lora

        loaded = comfy.lora.load_lora(dict(sd), comfy.lora.model_lora_keys_unet(model, {}))
        keys = {k if isinstance(k, str) else k[0] for k in loaded}
        return max(comfy.utils.get_attr(model, k).numel() * 4 for k in keys), len(loaded)

    out = {}
    for name, sd in (
            ("diffusers LoRA", kit.family_lora(model, "flux", rank=rank)),
            ("LyCORIS LoKr", kit.adapter_lora(model, "lokr", "lycoris", w2_rank=rank)),
            ("OFT (alpha 1)", kit.adapter_lora(model, "oft", "kohya", block=64, alpha=1.0))):
        sd = {k: v.to(torch.bfloat16) if k.endswith(("weight", "lokr_w1", "lokr_w2_a", "lokr_w2_b", "oft_blocks"))
              else v for k, v in sd.items()}
        out[name] = (sd,) + largest(sd)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--comfyui", help="ComfyUI tree (default: as for `python -m freefuse_bypass_patch check`)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    kit.use_comfyui(args.comfyui or kit.default_comfyui())
    torch.set_num_threads(1)
    import comfy.sd

    import freefuse_bypass_patch as ffbp
    from freefuse_bypass_patch.patching import comfyui_version

    base = kit.build_model("flux", kit.flux_config(depth=2, depth_single_blocks=2), device="meta")
    print("ComfyUI %s, Flux hidden 3072 (2 + 2 blocks) on the meta device, bf16 factors, rank %d, %d rounds"
          % (comfyui_version(), args.rank, args.rounds))
    print("%-16s %8s %12s %12s %7s %14s %14s" % ("LoRA", "adapters", "stock ms/ad", "plugin ms/ad", "ratio",
                                                  "stock alloc/W", "plugin alloc/W"))
    for name, (sd, weight_bytes, adapters) in loras(base.model, args.rank).items():
        times = {"stock": [], "plugin": []}
        alloc = {}
        logging.disable(logging.WARNING)  # stock names every key it drops, each load
        try:
            for n in range(args.rounds + 2):  # round 0 warms both up; the last one watches allocations
                for mode in ("stock", "plugin"):
                    if mode == "stock":
                        ffbp.uninstall()
                    try:
                        if n == args.rounds + 1:
                            with kit.LargestNewCpuTensor() as watch:
                                comfy.sd.load_bypass_lora_for_models(base, None, sd, 1.0, 0)
                            alloc[mode] = watch.largest
                        else:
                            start = time.perf_counter()
                            comfy.sd.load_bypass_lora_for_models(base, None, sd, 1.0, 0)
                            times[mode].append(time.perf_counter() - start)
                    finally:
                        ffbp.install()
        finally:
            logging.disable(logging.NOTSET)
        stock, plugin = (statistics.median(times[m][1:]) * 1000 / adapters for m in ("stock", "plugin"))
        print("%-16s %8d %12.3f %12.3f %7.2f %14.4f %14.4f" % (name, adapters, stock, plugin, plugin / stock,
                                                               alloc["stock"] / weight_bytes,
                                                               alloc["plugin"] / weight_bytes))
    print("(ms/ad: one load's time over its adapters, median; alloc/W: the largest CPU tensor a load creates, "
          "over the largest adapted weight in fp32, in a separate watched load)")


if __name__ == "__main__":
    main()
