"""LoKr/LoHa/DoRA/OFT/BOFT/GLoRA in bypass mode: time and memory, merged vs stock vs plugin (issue 8).

    python benchmarks/adapter_overhead.py [--adapter all|lokr|loha|dora|oft|boft|glora[,...]]
        [--config cpu|dev|tiny] [--modes merged,stock,plugin] [--forwards N] [--comfyui PATH]
        [--then-merged-lora]

A Flux built by ComfyUI's own classes (``kit.tiny_flux``) gets ONE adapter of the
given type on every attention/MLP linear (the ``ATTN_MLP`` targets of bypass_overhead.py),
named with kohya names (``lora_unet_double_blocks_0_img_attn_qkv``): plain string keys on
the whole fused weight, which stock bypass applies too, so the comparison with stock is
fair. Factors are shaped as trainers save them (see ``FACTORS``).

Modes: ``merged`` (comfy.sd.load_lora_for_models), ``stock`` (the plugin uninstalled, then
comfy.sd.load_bypass_lora_for_models) and ``plugin`` (installed, same loader), plus ``base``
(no adapter) once as the memory reference. Each case: loader call + ComfyUI load, one
first forward (reported: the plugin may build caches there), one more forward (the peak
memory is read over these), then N timed forwards (median reported). Printed per adapter type: ms per forward, ratios to merged and to
stock, first-forward and load ms, extra peak memory over base, the extra over stock's as a
fraction of the adapted weights' bytes (the weights that carry an adapter, in the model
dtype), and max|out - merged| / max|merged| on the same input.
A "targets" block then checks the issue's targets that apply to the device.

Memory. CPU: every case runs in its own process (the script re-invokes itself with
``--case``), so no allocation of one case survives into another. The child builds the
model, the inputs and the LoRA state dict, then resets the kernel's RSS high-water mark
(``echo 5 > /proc/self/clear_refs`` sets VmHWM to the current VmRSS) and records VmRSS;
after loader + load + two forwards, peak = VmHWM - that VmRSS. Children run with glibc's
``MALLOC_MMAP_THRESHOLD_=131072``, so freed tensors leave RSS and peaks repeat within a MiB;
the timed forwards come after the peak is read, with glibc's threshold raised again
(``mallopt``), since page faults on every large temporary would skew the timings.
The extra of a mode is its peak minus base's (base's holds a plain forward's activations).
Each child writes its output to a temporary folder after measuring; the parent compares.
CUDA: the cases run in one process, one after another, on one model; per case
``max_memory_allocated`` (after ``reset_peak_memory_stats``) minus the memory allocated
before it; unloaded, cache emptied, between cases; extra = that minus base's.

Configs: ``cpu`` (default on CPU): hidden 1024, 8 heads, 2 double + 2 single blocks, fp32,
24x24 latent (144 image tokens) + 48 text tokens, one thread: 0.28 GiB of adapted weights
and a forward of a few tenths of a second. ``dev``: the Flux.1-dev shape (hidden 3072,
19 + 38 blocks, 228 adapted weights, 16 GiB in bf16) at 1024x1024 (4096 + 512 tokens),
bf16, CUDA. ``tiny``: a seconds-long smoke run (numbers meaningless).
"""

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

from bypass_overhead import ATTN_MLP  # noqa: E402  (same targets as the LoRA benchmark)

from freefuse_bypass_patch import kit as sc  # noqa: E402

CONFIGS = {
    "cpu": dict(model=dict(hidden_size=1024, num_heads=8, depth=2, depth_single_blocks=2, context_in_dim=512,
                           vec_in_dim=256, axes_dim=[32, 48, 48]),
                image=24, tokens=48, dtype=torch.float32, device="cpu"),
    "dev": dict(model=dict(hidden_size=3072, num_heads=24, depth=19, depth_single_blocks=38, context_in_dim=4096,
                           vec_in_dim=768, axes_dim=[16, 56, 56]),
                image=128, tokens=512, dtype=torch.bfloat16, device="cuda"),
    "tiny": dict(model=dict(hidden_size=128, num_heads=2, depth=1, depth_single_blocks=1, context_in_dim=64,
                            vec_in_dim=64, axes_dim=[16, 24, 24]),
                 image=8, tokens=8, dtype=torch.float32, device="cpu"),
}
RANK = 16          # LoHa, DoRA, GLoRA rank; LoKr's w2 rank
LOKR_FACTOR = 16   # LoKr w1 is 16 x 16 (LyCORIS factor 16 on dims divisible by 16)
OFT_BLOCK = 64     # divides every output dim of Flux at hidden 128, 1024 and 3072
BOFT_STAGES = 2
ADAPTERS = {
    "lokr": "LoKr (w1 %dx%d, w2 rank %d)" % (LOKR_FACTOR, LOKR_FACTOR, RANK),
    "loha": "LoHa (rank %d)" % RANK,
    "dora": "DoRA (LoRA rank %d + dora_scale)" % RANK,
    "oft": "OFT (blocks of %d)" % OFT_BLOCK,
    "boft": "BOFT (%d butterfly stages, blocks of %d)" % (BOFT_STAGES, OFT_BLOCK),
    "glora": "GLoRA (rank %d, new form)" % RANK,
}
MODES = ("merged", "stock", "plugin")


# -- the adapters ---------------------------------------------------------------------
# kind -> kit.adapter_factors options: factors shaped as LyCORIS/kohya trainers save them, scales
# that keep each delta's entries near 0.005 (a tenth of the N(0, 0.05) weights), so the adapter
# changes the output visibly and the output stays sane.
FACTORS = {
    "lokr": dict(factor=LOKR_FACTOR, w2_rank=RANK, scale=0.1, alpha=RANK),  # kron(w1, w2_a @ w2_b), alpha / rank
    "loha": dict(rank=RANK, scale=0.13, alpha=RANK),  # (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank
    "dora": dict(rank=RANK, scale=0.035, alpha=RANK, magnitude_scale=0.05),  # magnitudes near the row norms
    "oft": dict(block=OFT_BLOCK, scale=0.005, alpha=0.0),  # alpha 0: no norm constraint
    "boft": dict(block=OFT_BLOCK, stages=BOFT_STAGES, scale=0.005, alpha=0.0),
    "glora": dict(rank=RANK, scale=0.02, alpha=RANK),  # new form: W a1 a2 + b1 b2
}


def attn_mlp_targets(model):
    """(kohya name, weight key, (out, in)) for every attention/MLP linear, from ComfyUI's own key
    map (so the names are exactly what the tree recognises); each weight once."""
    targets, seen = [], set()
    for name, target, shape in sc.named_targets(model, "lora_unet_"):
        if isinstance(target, str) and ATTN_MLP.search(target) and target not in seen:
            seen.add(target)
            targets.append((name, target, shape))
    return targets


def adapter_lora(model, kind, dtype, seed=1):
    """A state dict with one ``kind`` adapter on every attention/MLP linear, kohya names.

    Tensors are stored in the model dtype, as a trainer saving in that precision would; DoRA
    magnitudes start near the weight's own row norms, as a trained DoRA's do.
    """
    return sc.adapter_lora(model, kind, seed=seed, targets=attn_mlp_targets(model), dtype=dtype, weight_norms=True,
                           **FACTORS[kind])


def later_lora(args, base, cfg):
    """``--then-merged-lora``: a plain LoRA (rank 16) on the same weights, loaded merged after the adapter."""
    if not args.then_merged_lora:
        return None
    return sc.adapter_lora(base.model, "lora", seed=2, targets=attn_mlp_targets(base.model), dtype=cfg["dtype"],
                           rank=RANK, scale=0.02, alpha=RANK)


# -- one case -------------------------------------------------------------------------
class RssMeter:
    """Peak resident memory since ``start``: VmHWM after resetting it through /proc/self/clear_refs."""

    def start(self):
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.before = self._status("VmRSS")

    def peak(self):
        return self._status("VmHWM") - self.before

    @staticmethod
    def release():
        """Once the peak is read: let glibc keep freed blocks again. The low mmap threshold that
        makes peaks repeat also makes every large temporary fault its pages in anew, which
        slows every mode (merged ~1.3x) and the ones with more temporaries most."""
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: glibc's maximum
        libc.mallopt(-1, 1 << 30)   # M_TRIM_THRESHOLD: keep freed memory in the heap

    @staticmethod
    def _status(field):
        with open("/proc/self/status") as f:
            return int(re.search(r"^%s:\s+(\d+) kB" % field, f.read(), re.M).group(1)) * 1024


class CudaMeter:
    """Peak device memory allocated since ``start``, beyond what was allocated then."""

    def start(self):
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.before = torch.cuda.memory_allocated()

    def peak(self):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - self.before

    @staticmethod
    def release():
        pass


def measure(base, inputs, lora, mode, forwards, meter, after=None):
    """Attach ``lora`` in ``mode`` (or nothing for "base"), then ``after`` merged (a plain LoRA,
    ``--then-merged-lora``), load, forward 2 + ``forwards`` times.

    Returns (result dict, output of the last forward or None). An exception in the loader
    or a forward is reported as ``error``; what was measured until then is kept.
    """
    import comfy.model_management as mm
    import comfy.sd

    import freefuse_bypass_patch as ffbp

    cuda = inputs["x"].is_cuda

    def clock():
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    result, out = dict(mode=mode), None
    if mode == "stock":
        ffbp.uninstall()
    # looked up after uninstall(): the plugin wraps this module attribute
    loader = comfy.sd.load_lora_for_models if mode == "merged" else comfy.sd.load_bypass_lora_for_models
    meter.start()
    try:
        start = clock()
        patcher = base if mode == "base" else loader(base, None, lora, 1.0, 0)[0]
        if after is not None:  # merged after the adapter: the plugin replays modules that read W'
            patcher = comfy.sd.load_lora_for_models(patcher, None, after, 1.0, 0)[0]
        mm.load_models_gpu([patcher])
        result["load_ms"] = (clock() - start) * 1e3
        with torch.inference_mode():
            start = clock()
            out = sc.apply_model(patcher, inputs)
            result["first_ms"] = (clock() - start) * 1e3
            out = sc.apply_model(patcher, inputs)  # a steady forward inside the memory window
            result["peak"] = meter.peak()
            meter.release()
            times = []
            for _ in range(forwards):
                start = clock()
                out = sc.apply_model(patcher, inputs)
                times.append(clock() - start)
        result["ms"] = statistics.median(times) * 1e3
    except Exception as err:  # e.g. stock OFT on 0.28.0: "view size is not compatible ..."
        result["error"] = "%s: %s" % (type(err).__name__, (str(err).splitlines() or [""])[0].split(" (")[0][:80])
        out = None
    finally:
        result.setdefault("peak", meter.peak())
        mm.unload_all_models()
        if mode == "stock":
            ffbp.install()
    return result, (out.float().cpu() if out is not None else None)


def setup(args, cfg, device):
    """Import the ComfyUI tree, build the model and inputs; returns (patcher, inputs, info)."""
    sc.use_comfyui(args.comfyui, cpu=device.type == "cpu")
    import logging

    logging.getLogger().setLevel(logging.ERROR)  # stock bypass and LoHa's h() warn on every load
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    import comfy.sd  # noqa: F401  (the plugin installs itself on this import)

    from freefuse_bypass_patch.patching import comfyui_version

    base = sc.tiny_flux(0, device=device, dtype=cfg["dtype"], **cfg["model"])
    inputs = sc.flux_inputs(image=cfg["image"], tokens=cfg["tokens"], config=dict(cfg["model"], in_channels=16),
                            device=device, dtype=cfg["dtype"])  # 16 latent channels, as tiny_flux builds
    weights = base.model.state_dict()
    targets = [key for _, key, _ in attn_mlp_targets(base.model)]
    info = dict(version=comfyui_version(), params=sum(p.numel() for p in base.model.diffusion_model.parameters()),
                adapted=len(targets),
                adapted_bytes=sum(weights[k].numel() * weights[k].element_size() for k in targets))
    return base, inputs, info


def run_child(args, cfg):
    """``--case KIND:MODE`` (CPU): one case in this fresh process; prints one CASE json line."""
    kind, mode = args.case.split(":")
    base, inputs, info = setup(args, cfg, torch.device("cpu"))
    lora = adapter_lora(base.model, kind, cfg["dtype"]) if mode != "base" else None
    result, out = measure(base, inputs, lora, mode, args.forwards, RssMeter(), later_lora(args, base, cfg))
    if out is not None:  # after measuring: the file write is not in the peak
        torch.save(out, os.path.join(args.outdir, "%s_%s.pt" % (kind, mode)))
    print("CASE " + json.dumps(dict(result, kind=kind, **info)), flush=True)


def run_cases_in_subprocesses(args, cases):
    """CPU: each (kind, mode) in its own process; yields (result, output) as each finishes.

    A fixed glibc mmap threshold makes every block of 128 KiB or more its own mapping, given
    back when freed, so RSS follows the live tensors: peaks then repeat within a MiB
    (glibc's default threshold moves with the allocation history: +-50 MiB measured).
    """
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    with tempfile.TemporaryDirectory(prefix="ffbp_adapter_bench_") as outdir:
        for kind, mode in cases:
            cmd = [sys.executable, os.path.abspath(__file__), "--case", "%s:%s" % (kind, mode), "--outdir", outdir,
                   "--config", args.config, "--comfyui", args.comfyui, "--forwards", str(args.forwards),
                   "--threads", str(args.threads)] + (["--then-merged-lora"] if args.then_merged_lora else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("CASE ")), None)
            if line is None:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:70]
                yield dict(kind=kind, mode=mode, error="exit %d: %s" % (proc.returncode, tail)), None
                continue
            path = os.path.join(outdir, "%s_%s.pt" % (kind, mode))
            yield json.loads(line[5:]), (torch.load(path) if os.path.exists(path) else None)


def run_cases_in_process(args, cfg, device, cases):
    """CUDA (or ``--in-process``): every case in this process on one model, unloaded in between."""
    base, inputs, info = setup(args, cfg, device)
    meter = CudaMeter() if device.type == "cuda" else RssMeter()
    sc.forward(base, inputs)  # unmeasured: one-time allocations (cuBLAS workspaces) do not land on base
    loras, after = {}, later_lora(args, base, cfg)
    for kind, mode in cases:
        if mode != "base" and kind not in loras:
            loras.clear()
            gc.collect()
            loras[kind] = adapter_lora(base.model, kind, cfg["dtype"])
        result, out = measure(base, inputs, loras.get(kind), mode, args.forwards, meter, after)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        yield dict(result, kind=kind, **info), out


# -- report ---------------------------------------------------------------------------
def rel_diff(out, ref):
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def print_header(args, cfg, device, base_row):
    """What was built and how memory is measured, then the column legend."""
    if device.type == "cuda":
        method = "one process, torch.cuda.max_memory_allocated"
    else:
        method = "%s, peak RSS (VmHWM)" % ("one process" if args.in_process else "one process per case")
    print("ComfyUI %s | config %s | %s %s | model %.1fM params | one adapter on each of %d attention/MLP linears "
          "(%.1f MiB of weights) | %d image + %d text tokens | %d timed forwards | %s"
          % (base_row["version"], args.config, device, str(cfg["dtype"]).replace("torch.", ""),
             base_row["params"] / 1e6, base_row["adapted"], base_row["adapted_bytes"] / 2**20,
             (cfg["image"] // 2) ** 2, cfg["tokens"], args.forwards, method))
    print("columns: ms/fwd = median of the timed forwards; x merged, x stock = ratio to merged's, stock's;\n"
          "  1st fwd ms = the forward before them; load ms = loader call + ComfyUI load;\n"
          "  extra MiB = peak over base's (base: %.1f MiB, %.1f ms/fwd);\n"
          "  over stock = (extra - stock's extra) / adapted weights' bytes (over base's if stock crashed);\n"
          "  rel diff = max|out - merged| / max|merged| on the same input"
          % (base_row["peak"] / 2**20, base_row["ms"]), flush=True)


def print_kind(kind, rows, outs, base_row, base_out, adapted_bytes):
    """The table of one adapter type; returns {mode: row} with the derived numbers added."""
    merged, stock = rows.get("merged", {}), rows.get("stock", {})
    effect = rel_diff(outs["merged"], base_out) if "merged" in outs and base_out is not None else None
    print("\n== %s: %s | effect max|merged-base|/max|base| %s"
          % (kind, ADAPTERS[kind], "%.2e" % effect if effect is not None else "n/a"))
    print("%-7s %9s %9s %8s %11s %9s %10s %11s %15s" % ("mode", "ms/fwd", "x merged", "x stock", "1st fwd ms",
                                                        "load ms", "extra MiB", "over stock", "rel diff"))
    stock_extra = stock["peak"] - base_row["peak"] if "peak" in stock and "error" not in stock else 0
    for mode in MODES:
        row = rows.get(mode)
        if row is None:
            continue
        row["extra"] = row["peak"] - base_row["peak"] if "peak" in row else None
        row["over_stock"] = (row["extra"] - stock_extra) / adapted_bytes if row["extra"] is not None else None
        row["x_merged"] = row["ms"] / merged["ms"] if "ms" in row and "ms" in merged else None
        row["x_stock"] = row["ms"] / stock["ms"] if "ms" in row and "ms" in stock else None
        row["diff"] = rel_diff(outs[mode], outs["merged"]) if mode in outs and "merged" in outs else None
        cells = [_num(row.get("ms"), "%.1f"), _num(row["x_merged"], "%.3f"), _num(row["x_stock"], "%.3f"),
                 _num(row.get("first_ms"), "%.1f"), _num(row.get("load_ms"), "%.0f"),
                 _num(row["extra"] / 2**20 if row["extra"] is not None else None, "%.1f"),
                 _num(row["over_stock"], "%.3f"), _num(row["diff"], "%.3e")]
        line = "%-7s %9s %9s %8s %11s %9s %10s %11s %15s" % tuple([mode] + cells)
        if "error" in row:
            line += "  crash: " + row["error"]
        print(line)
    return rows


def _num(value, fmt):
    return fmt % value if value is not None else "n/a"


def print_targets(device, table, adapted_bytes):
    """The issue's targets that apply to ``device``, each with its measured value and PASS/MISS."""
    checks = []  # (label, measured, limit)
    for kind, rows in table.items():
        plugin = rows.get("plugin", {})
        if device.type == "cpu":
            stock_note = " (stock crashed: vs base)" if "error" in rows.get("stock", {}) else ""
            checks.append(("%s: plugin extra peak over stock / adapted weights%s" % (kind, stock_note),
                           plugin.get("over_stock"), 0.25))
            if kind == "lokr":
                checks.append(("lokr: plugin forward / stock forward", plugin.get("x_stock"), 1.25))
        else:
            extra = plugin.get("extra")
            checks.append(("%s: plugin extra device memory, GiB" % kind,
                           extra / 2**30 if extra is not None else None, 1.0))
            limit = {"lokr": None, "loha": 1.3, "dora": 1.15, "oft": 1.15, "boft": 1.15}.get(kind)
            if kind == "lokr":
                checks.append(("lokr: plugin forward / stock forward", plugin.get("x_stock"), 1.0))
            elif limit is not None:
                checks.append(("%s: plugin forward / merged forward" % kind, plugin.get("x_merged"), limit))
    print("\ntargets (issue 8, %s; adapted weights %.1f MiB):" % (device.type, adapted_bytes / 2**20))
    for label, value, limit in checks:
        verdict = "PASS" if value is not None and value <= limit else "MISS"
        print("  %-78s %8s <= %-5s %s" % (label, _num(value, "%.3f"), limit, verdict))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", default="all",
                        help="all, or one or more (comma-separated) of: " + ", ".join(ADAPTERS))
    parser.add_argument("--config", default=None, choices=sorted(CONFIGS), help="default: cpu, or dev on --device cuda")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: the config's")
    parser.add_argument("--modes", default=",".join(MODES), help="subset of merged,stock,plugin (base always runs)")
    parser.add_argument("--forwards", type=int, default=3, help="timed forwards per case, after one first forward")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("--comfyui", help="ComfyUI tree (default: as for `python -m freefuse_bypass_patch check`)")
    parser.add_argument("--in-process", action="store_true", help="on CPU too, run every case in this process "
                        "(memory numbers then less isolated; for checking the CUDA path without a GPU)")
    parser.add_argument("--then-merged-lora", action="store_true", help="in every mode (base too), a plain LoRA "
                        "loaded merged after the adapter (a chain merged applies in order: the plugin replays the "
                        "modules whose adapter reads W' or the output)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--outdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.config = args.config or ("dev" if args.device == "cuda" else "cpu")
    cfg = CONFIGS[args.config]
    device = torch.device(args.device or cfg["device"])
    if args.case:
        return run_child(args, cfg)
    args.comfyui = args.comfyui or sc.default_comfyui()
    if not args.comfyui:
        parser.error("no ComfyUI found: pass --comfyui PATH (or set COMFYUI_PATH)")
    kinds = list(ADAPTERS) if args.adapter == "all" else [k.strip() for k in args.adapter.split(",")]
    modes = [m for m in MODES if m in args.modes.split(",")]
    unknown = [k for k in kinds if k not in ADAPTERS]
    if unknown or not modes:
        parser.error("unknown adapter %s or no mode in %r" % (unknown, args.modes))

    cases = [("none", "base")] + [(k, m) for k in kinds for m in modes]
    if device.type == "cuda" or args.in_process:
        results = run_cases_in_process(args, cfg, device, cases)
    else:
        results = run_cases_in_subprocesses(args, cases)
    started = time.time()
    table, rows, outs = {}, {}, {}
    for result, out in results:
        kind, mode = result["kind"], result["mode"]
        if mode == "base":
            if "error" in result:
                sys.exit("the base model does not run: %s" % result["error"])
            base_row, base_out = result, out
            print_header(args, cfg, device, base_row)
            continue
        print("  case %-6s %-6s %s (%.0f s)" % (kind, mode, "crash: " + result["error"] if "error" in result
                                                else "%.1f ms/fwd" % result["ms"], time.time() - started), flush=True)
        rows[mode] = result
        if out is not None:
            outs[mode] = out
        if len(rows) == len(modes):
            table[kind] = print_kind(kind, rows, outs, base_row, base_out, base_row["adapted_bytes"])
            rows, outs = {}, {}
    if args.then_merged_lora:  # issue 8's targets are for an adapter alone
        print("(--then-merged-lora: DoRA/GLoRA/OFT/BOFT are replayed through the merge code in each forward, "
              "fp32 and full-size, as a transient adapter; issue 8's targets do not apply)")
    else:
        print_targets(device, table, base_row["adapted_bytes"])
    if device.type == "cpu":
        print("(CPU timings are noisy on a shared machine; %s)" % ("memory is not isolated in one process"
              if args.in_process else "memory is measured per process and repeats within a few MiB"))


if __name__ == "__main__":
    main()
