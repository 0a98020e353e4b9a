"""Register qrecover's quantization method with transformers once transformers is imported.

Registering imports transformers (seconds), which a user of `qrecover.quant` or the kernels alone
should not pay for. So `import qrecover` registers at once only when transformers is already loaded;
otherwise it leaves a finder on `sys.meta_path` that registers right after transformers' own
`__init__` has run, before the caller can reach `from_pretrained`.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys


def register() -> None:
    importlib.import_module("qrecover.hf_quantizer")


class _AfterTransformers(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)  # one shot; find_spec below then takes the ordinary finders
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run_init = spec.loader.exec_module

        def exec_module(module):
            run_init(module)
            register()

        spec.loader.exec_module = exec_module
        return spec


def register_when_transformers_loads() -> None:
    if "transformers" in sys.modules:
        register()
    elif not any(isinstance(f, _AfterTransformers) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformers())
