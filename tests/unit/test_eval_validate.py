"""trainer.evaluate.validate through the evaluation protocol, with a fake rollout handle (no Ray)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from deepeyes.config import load_config
from deepeyes.data import read_deepeyes, write_synthetic
from trainer.eval.items import read_parquet
from trainer.evaluate import validate
from trainer.metrics import VALIDATION


class FakeHandle:
    """Answers each episode with the reference's text (or "A"), as a rollout app would return it."""

    def __init__(self, answer_reference: bool):
        self.answer_reference, self.requests = answer_reference, []

    @property
    def run_episode(self):
        return self

    def remote(self, req):
        self.requests.append(req)
        text = f"<answer>{req.ground_truth if self.answer_reference else 'A'}</answer>"
        traj = SimpleNamespace(uid=req.uid, response_text=text, tool_calls=[], crops_returned=0, num_turns=2,
                               finish_reason="answer", images=list(req.images), extra=dict(req.extra),
                               reward=SimpleNamespace(score=0.8 if self.answer_reference else 0.0,
                                                      acc=1.0 if self.answer_reference else 0.0, judge_ok=True), data_source="vstar")
        return SimpleNamespace(result=lambda timeout_s=None: traj)


@pytest.fixture(scope="module")
def val(tmp_path_factory):
    cfg = load_config()
    path = write_synthetic(str(tmp_path_factory.mktemp("val") / "val.parquet"), 12, 5, mix={"vstar": 1.0}, split="val")
    return list(read_deepeyes([path], cfg.data)), path, cfg


def test_validate_keeps_its_signature_and_metric_names(val):
    rows, path, cfg = val
    cfg.trainer.val_rows = 8
    handle = FakeHandle(answer_reference=True)
    m = validate(cfg, handle, None, rows, step=3, version=2)
    assert set(m) == set(VALIDATION) - {"val/acc_no_tool"}  # the ablation runs in full validations only
    assert len(handle.requests) == 8 and all(r.min_version == 2 and r.greedy for r in handle.requests)
    assert m["val/acc"] == 1.0 and m["val/episodes"] == 8 and m["val/failed"] == 0
    # the options were shuffled, and multiple-choice rows list them again in the row's own style
    mc = [r for r in handle.requests if "Options: (A)" in r.question]
    assert mc and all("Answer with the option's word." in r.question for r in mc)
    items = list(read_parquet([path], cfg.data))
    assert any(i.multiple_choice for i in items)


def test_validate_always_a_is_not_rewarded_for_the_letter(val):
    rows, _, cfg = val
    cfg.trainer.val_rows = 0
    m = validate(cfg, FakeHandle(answer_reference=False), None, iter(rows), step=1, version=0)
    # "A" is right only where the shuffle put the answer first (free-form rows: the judge says no)
    assert m["val/acc"] < 0.5


def test_full_validation_runs_k_samples_with_and_without_the_tool(val):
    """The start/end validation: final_val_rows rows, final_val_k samples each, both modes; the
    no-tool episodes declare no tool, and crops come from the original with tools.crop_from."""
    rows, _, cfg = val
    cfg.trainer.val_rows, cfg.trainer.final_val_rows, cfg.trainer.final_val_k = 2, 5, 3
    cfg.trainer.final_val_no_tool = True
    cfg.tools.crop_from = "original"
    handle = FakeHandle(answer_reference=True)
    m = validate(cfg, handle, None, rows, step=0, version=0, full=True)
    assert set(m) == set(VALIDATION)
    assert len(handle.requests) == 5 * 3 * 2
    tool = [r for r in handle.requests if r.use_tools]
    no_tool = [r for r in handle.requests if not r.use_tools]
    assert len(tool) == len(no_tool) == 15
    assert all(r.crop_source is not None for r in tool) and all(r.crop_source is None for r in no_tool)
    assert m["val/acc"] == m["val/acc_no_tool"] == 1.0 and m["val/k"] == 3 and m["val/items"] == 5
    # the periodic validation of the same config: val_rows rows, once, with the tool only
    handle = FakeHandle(answer_reference=True)
    m = validate(cfg, handle, None, rows, step=10, version=0)
    assert len(handle.requests) == 2 and all(r.use_tools for r in handle.requests)
    assert "val/acc_no_tool" not in m
