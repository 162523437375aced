"""Tiny GGUF models for the tests and the benchmark, loaded by city96's ComfyUI-GGUF.

Quantized models are the main reason people use bypass, and ComfyUI-GGUF is the most used
loader of them. Its weights are ``GGMLTensor`` block bytes, dequantized (and merged-patched)
inside each forward. To test against the real thing: ComfyUI-GGUF is loaded the way ComfyUI
loads any custom node (``nodes.load_custom_node`` on a copy in a temporary ``custom_nodes``),
a tiny Flux built by ComfyUI's classes is written as GGUF with the ``gguf`` package (Q8_0)
and a small Q4_K quantizer of ours (the package writes no K-quants), and the file is loaded
by the node's own ``UnetLoaderGGUF``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Callable, Dict, Optional

import numpy as np
import torch

from .models import build_model, detectable_flux_state_dict, flux_config

# A Flux that ComfyUI's model detection reads back as itself (2 heads of 128 at hidden 256).
# Hidden 256 is the smallest width whose block linears all take Q4_K (256-wide super-blocks);
# 2 + 2 blocks: ~7M parameters. flux_inputs(config=GGUF_FLUX) feeds it.
GGUF_FLUX = flux_config(hidden_size=256, depth=2, depth_single_blocks=2, context_in_dim=64, vec_in_dim=64)

NODE_ENV = "COMFYUI_GGUF_PATH"  # a ComfyUI-GGUF checkout; default: ../shared/custom_nodes/ComfyUI-GGUF


def node_source() -> Optional[str]:
    """Where ComfyUI-GGUF's code is: $COMFYUI_GGUF_PATH, else beside the repository in ../shared."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.environ.get(NODE_ENV) or os.path.join(os.path.dirname(repo), "shared", "custom_nodes", "ComfyUI-GGUF")
    return path if os.path.isfile(os.path.join(path, "nodes.py")) else None


class GGUFNode:
    """ComfyUI-GGUF as loaded into this process: its node classes and its modules."""

    def __init__(self, package: str):
        self.package = package
        self.nodes = sys.modules[package + ".nodes"]
        self.ops = sys.modules[package + ".ops"]
        self.dequant = sys.modules[package + ".dequant"]

    def load_unet(self, path: str):
        """A ModelPatcher from the node's own ``UnetLoaderGGUF`` (the file's folder is registered)."""
        import folder_paths

        folder_paths.add_model_folder_path("diffusion_models", os.path.dirname(path))
        return self.nodes.UnetLoaderGGUF().load_unet(os.path.basename(path))[0]

    def dequantized(self, tensor: torch.Tensor) -> torch.Tensor:
        """The node's own dequantization of one tensor, in fp32."""
        return self.dequant.dequantize_tensor(tensor, torch.float32)

    def is_gguf(self, tensor) -> bool:
        return isinstance(tensor, self.ops.GGMLTensor)


def load_node(source: str) -> GGUFNode:
    """Load ComfyUI-GGUF from a copy of ``source`` in a temporary custom_nodes folder, with the
    running tree's own loader (:func:`~.comfyui.load_custom_node`). RuntimeError if that tree
    cannot load it (the 0.12.1 fork: its folder_paths rejects an argument the node passes)."""
    from .comfyui import load_custom_node

    folder = os.path.join(tempfile.mkdtemp(prefix="ffbp_gguf_"), "custom_nodes", "ComfyUI-GGUF")
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("__pycache__", ".git"))
    added, ok = load_custom_node(folder)
    nodes_file = os.path.join(folder, "nodes.py")
    loaded = [name for name, module in list(sys.modules.items()) if getattr(module, "__file__", None) == nodes_file]
    if not ok or not added or not loaded:
        raise RuntimeError("this ComfyUI did not load ComfyUI-GGUF from %s (nodes added: %d)" % (folder, added))
    return GGUFNode(loaded[0].rsplit(".", 1)[0])


# -- writing GGUF files --------------------------------------------------------------------
QK_K = 256  # values per K-quant super-block


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """Q4_K blocks of a float array (..., n·256): per super-block an fp16 scale and min, eight
    6-bit sub-block scales and mins (packed in 12 bytes), 4-bit values: 144 bytes per 256.

    Value = d·sc_j·q − dmin·m_j in sub-block j. A plain min/max fit, not llama.cpp's search:
    the tests need valid blocks, not the best ones.
    """
    rows = x.reshape(-1, 8, 32).astype(np.float32)
    low = np.minimum(rows.min(-1), 0.0)
    step, mins = (rows.max(-1) - low) / 15, -low  # per sub-block, both >= 0
    d = (step.max(-1) / 63).astype(np.float16)
    dmin = (mins.max(-1) / 63).astype(np.float16)
    sc = _six_bit(step, d.astype(np.float32))
    m = _six_bit(mins, dmin.astype(np.float32))
    scale = d.astype(np.float32)[:, None] * sc
    offset = dmin.astype(np.float32)[:, None] * m
    q = np.round((rows + offset[..., None]) / np.where(scale > 0, scale, 1)[..., None])
    q = np.clip(q, 0, 15).astype(np.uint8)  # (blocks, 8, 32)
    packed = np.zeros((rows.shape[0], 12), np.uint8)
    packed[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((m[:, 4:8] & 0x0F) << 4)
    nibbles = q[:, 0::2] | (q[:, 1::2] << 4)  # sub-blocks 2i (low) and 2i+1 (high): (blocks, 4, 32)
    blocks = np.concatenate([d[:, None].view(np.uint8), dmin[:, None].view(np.uint8), packed,
                             nibbles.reshape(-1, 128)], axis=1)
    return blocks.reshape(*x.shape[:-1], x.shape[-1] // QK_K * 144)


def _six_bit(values: np.ndarray, unit: np.ndarray) -> np.ndarray:
    return np.clip(np.round(values / np.where(unit > 0, unit, 1)[:, None]), 0, 63).astype(np.uint8)


def mixed_quants(key: str, shape) -> str:
    """Block linears of block 0 in Q8_0 and of block 1 in Q4_K (both kinds in one model); other
    2-D weights Q8_0 where their width allows it; everything else F32."""
    if len(shape) != 2 or not key.endswith(".weight"):
        return "F32"
    if ".1." in key and key.startswith(("double_blocks.", "single_blocks.")) and shape[1] % QK_K == 0:
        return "Q4_K"
    return "Q8_0" if shape[1] % 32 == 0 else "F32"


def write_gguf(path: str, state_dict: Dict[str, torch.Tensor], arch: str = "flux",
               quant: Callable[[str, tuple], str] = mixed_quants) -> Dict[str, str]:
    """Write ``state_dict`` as a GGUF file with each tensor in the type ``quant`` names;
    returns {key: type name}."""
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    kinds = {}
    for key, tensor in state_dict.items():
        data = tensor.detach().to(torch.float32).cpu().numpy()
        kind = kinds[key] = quant(key, tuple(data.shape))
        if kind == "F32":
            writer.add_tensor(key, data)
        elif kind == "Q4_K":
            writer.add_tensor(key, quantize_q4_k(data), raw_dtype=gguf.GGMLQuantizationType.Q4_K)
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(key, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return kinds


def gguf_flux(node: GGUFNode, folder: str, seed: int = 0, quant: Callable[[str, tuple], str] = mixed_quants,
              **overrides):
    """(GGUF patcher from the node's loader, fp32 reference patcher holding the node's own
    dequantization of every weight, {key: GGUF type}) for a random detectable Flux
    (``GGUF_FLUX`` with ``overrides``, e.g. other sizes for the benchmark)."""
    config = dict(GGUF_FLUX, **overrides)
    sizes = {k: v for k, v in config.items() if k not in ("hidden_size", "depth", "depth_single_blocks")}
    path = os.path.join(folder, "tiny_flux_%d.gguf" % seed)
    kinds = write_gguf(path, detectable_flux_state_dict(config["hidden_size"], config["depth"],
                                                        config["depth_single_blocks"], seed=seed, **sizes), quant=quant)
    quantized = node.load_unet(path)
    reference = build_model("flux", config, seed=seed, device="cpu")
    values = {}
    for name, tensor in quantized.model.diffusion_model.named_parameters():
        values[name] = node.dequantized(tensor) if node.is_gguf(tensor) else tensor.detach().to(torch.float32)
    with torch.no_grad():
        missing, unexpected = reference.model.diffusion_model.load_state_dict(values, strict=False)
    if unexpected or any(k in kinds for k in missing):
        raise RuntimeError("GGUF model and reference differ: missing %s, unexpected %s" % (missing, unexpected))
    return quantized, reference, kinds
