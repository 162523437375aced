"""Test-only placeholder for torchvision.

The PyPI torchvision wheel does not load beside the CPU torch wheel ('torchvision::nms does
not exist'). ComfyUI imports torchvision at module level only in model files this project
never runs (cosmos, cascade, ace ...), so a placeholder whose every attribute is an inert
stub is enough for those imports. conftest.py puts this folder on sys.path only when no
real torchvision can be imported.
"""

import sys
import types


class _Stub:
    def __init__(self, name):
        self._name = name

    def __call__(self, *args, **kwargs):
        raise NotImplementedError("%s is a test placeholder (no torchvision here)" % self._name)

    def __getattr__(self, item):
        if item.startswith("__"):
            raise AttributeError(item)
        return _Stub(self._name + "." + item)


def _module(name):
    module = types.ModuleType(name)
    module.__path__ = []  # a package, so that any submodule import resolves too

    def __getattr__(item, _name=name):
        if item.startswith("__"):
            raise AttributeError(item)
        return _Stub(_name + "." + item)

    module.__getattr__ = __getattr__
    return module


class _Finder:
    """Resolves every ``torchvision.*`` / ``torchaudio.*`` submodule to a placeholder module."""

    @staticmethod
    def find_spec(fullname, path=None, target=None):
        import importlib.machinery

        if fullname.split(".")[0] in ("torchvision", "torchaudio") and fullname not in ("torchvision",):
            return importlib.machinery.ModuleSpec(fullname, _Loader(), is_package=True)
        return None


class _Loader:
    @staticmethod
    def create_module(spec):
        return _module(spec.name)

    @staticmethod
    def exec_module(module):
        pass


if not any(isinstance(f, _Finder) or type(f).__name__ == "_Finder" for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())

__version__ = "0.0.0+placeholder"


def __getattr__(item):
    if item.startswith("__"):
        raise AttributeError(item)
    return _Stub("torchvision." + item)
