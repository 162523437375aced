"""Bypass under ComfyUI's lowvram partial loading on a GPU: weights stay on the CPU and are
cast to the GPU per layer at forward time; adapter factors must follow the activations.

    python benchmarks/lowvram_gpu_check.py --comfyui PATH

Prints max |bypass - merged| / max |merged| for a diffusers LoRA chained with a kohya DoRA
on a small Flux built by ComfyUI, fully loaded and partially loaded, in fp32 and bf16.
Needs CUDA; the CPU version of this check is tests/test_lowvram.py.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"))
    parser.add_argument("--device", default="cuda", help="cuda (the point of it) or cpu (a dry run of the script)")
    args = parser.parse_args()
    from freefuse_bypass_patch import kit as sc

    sc.use_comfyui(args.comfyui, cpu=args.device == "cpu")
    import comfy.model_patcher
    import comfy.sd

    import freefuse_bypass_patch  # noqa: F401  (activates the plugin)

    cuda, cpu = torch.device(args.device), torch.device("cpu")
    import comfy.model_management as mm

    # ComfyUI merges LoRA weights on a GPU in fp16 (lora_compute_dtype); the reference
    # here is the merged result computed in fp32, as the lowvram path computes it.
    print("ComfyUI's merge dtype on %s: %s (set to float32 for the reference)" % (cuda, mm.lora_compute_dtype(cuda)))
    mm.LORA_COMPUTE_DTYPES[cuda] = torch.float32
    print("fp32 matmul precision %s, cuBLAS TF32 %s, NVIDIA_TF32_OVERRIDE=%s" % (
        torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
        os.environ.get("NVIDIA_TF32_OVERRIDE", "unset")))
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        base = sc.tiny_flux(dtype=dtype, hidden_size=256, num_heads=4, axes_dim=[16, 24, 24], depth=2,
                            depth_single_blocks=4)
        base = comfy.model_patcher.ModelPatcher(base.model, load_device=cuda, offload_device=cpu)
        config = dict(sc.TINY_FLUX, hidden_size=256, num_heads=4)
        inputs = sc.flux_inputs(image=32, tokens=16, config=config, device=cuda, dtype=dtype)
        loras = [(sc.make_lora(base.model, "diffusers", rank=8, seed=1, alpha=8), 0.9),
                 (sc.adapter_lora(base.model, "dora", "kohya", seed=2, limit=10), 0.6)]

        def run(patcher, budget):
            patcher.patch_model(cuda, lowvram_model_memory=budget)
            try:
                lowvram = sum(1 for m in patcher.model.modules() if getattr(m, "comfy_cast_weights", False))
                on_cpu = sum(1 for p in patcher.model.parameters() if p.device.type == "cpu")
                out = sc.apply_model(patcher, inputs).float().cpu()
                return out, lowvram, on_cpu
            finally:
                patcher.unpatch_model(cpu)

        for budget, label in ((0, "full load"), (256 * 1024, "lowvram (256 KiB budget)")):
            merged, lv_m, cpu_m = run(sc.chain(comfy.sd.load_lora_for_models, base, loras), budget)
            bypass, lv_b, cpu_b = run(sc.chain(comfy.sd.load_bypass_lora_for_models, base, loras), budget)
            plain, _, _ = run(base, budget)
            rel = sc.max_rel_diff(bypass, merged)
            print("%-9s %-26s lowvram modules %3d, weights left on CPU %3d | LoRA effect %.3e | "
                  "max|bypass-merged|/max %.3e %s" % (str(dtype).replace("torch.", ""), label, lv_b, cpu_b,
                                                      sc.max_rel_diff(merged, plain), rel,
                                                      "OK" if rel <= tol else "MISMATCH (tol %g)" % tol))


if __name__ == "__main__":
    main()
