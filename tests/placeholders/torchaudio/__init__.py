"""Test-only placeholder for torchaudio (no wheel matches the CPU torch); see torchvision's."""

import torchvision as _placeholders  # noqa: F401  installs the finder for torchaudio.* submodules

__version__ = "0.0.0+placeholder"


def __getattr__(item):
    if item.startswith("__"):
        raise AttributeError(item)
    return _placeholders._Stub("torchaudio." + item)
