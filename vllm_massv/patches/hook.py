"""The mechanism every patch uses: a `sys.meta_path` hook that runs a patch function right after
its vLLM module finishes importing (so the API-server process never imports worker modules just
for the plugin), and :func:`patches_class`, which makes patching a class idempotent.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable, Mapping
from typing import Any

PATCHED_FLAG = "_massv_patched"


def patches_class(name: str) -> Callable[[Callable[[type], None]], Callable[[Any], None]]:
    """Decorator: turn `patch(cls)` into `patch(module)` that patches `module.<name>` once per
    process (a flag on the class marks it patched; re-running is a no-op)."""

    def decorate(patch: Callable[[type], None]) -> Callable[[Any], None]:
        @functools.wraps(patch)
        def patch_module(module: Any) -> None:
            cls = getattr(module, name)
            if getattr(cls, PATCHED_FLAG, False):
                return
            patch(cls)
            setattr(cls, PATCHED_FLAG, True)

        return patch_module

    return decorate


class PostImportHook(importlib.abc.MetaPathFinder):
    """Runs `patches[name](module)` right after module `name` finishes importing."""

    def __init__(self, patches: Mapping[str, Callable[[Any], None]]) -> None:
        self.patches = patches

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.patches:
            return None
        sys.meta_path.remove(self)  # find the real spec without recursing into ourselves
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            self.patches[fullname](module)

        spec.loader.exec_module = exec_and_patch
        return spec


def install_hook(patches: Mapping[str, Callable[[Any], None]]) -> None:
    """Patch the modules of `patches` already imported, and hook the rest (idempotent)."""
    for name, patch in patches.items():
        if name in sys.modules:
            patch(sys.modules[name])
    if not any(isinstance(f, PostImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, PostImportHook(patches))
