"""Packed (padding-free) and padded updates give the same loss and gradients."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from deepeyes.chat import CHAT_TEMPLATE
from deepeyes.policy import encode_text_with_images, load_policy, process_images, resize_for_model
from trainer.grpo import clipped_policy_loss
from trainer.packing import make_example, pack, packed_forward, padded_forward, plan_micro_batches


def test_plan_micro_batches_first_fit_decreasing():
    bins = plan_micro_batches([5, 9, 3, 7, 2, 12], budget=10)
    # by hand, largest first: 12 (i5) opens bin 0 (over budget, alone); 9 (i1) opens bin 1 (room 1);
    # 7 (i3) opens bin 2 (room 3); 5 (i0) opens bin 3 (room 5); 3 (i2) fits bin 2 (room 0);
    # 2 (i4) skips bin 1 (room 1) and bin 2 (room 0) and fits bin 3.
    assert bins == [[5], [1], [3, 2], [0, 4]]
    assert all(sum([5, 9, 3, 7, 2, 12][i] for i in b) <= 10 or len(b) == 1 for b in bins)


@pytest.fixture(scope="module")
def policy(tiny_policy_dir):
    p = load_policy(tiny_policy_dir, trainable=True)
    p.model.eval()  # no dropout in this model, but be explicit: the comparison is exact maths
    return p


def _examples(policy):
    rng = torch.Generator().manual_seed(0)
    exs = []
    specs = [((300, 200), 1, 17), ((120, 460), 2, 5), (None, 0, 30), ((640, 640), 1, 9)]
    for k, (size, n_img, resp_len) in enumerate(specs):
        images = [resize_for_model(Image.new("RGB", size, (40 * k, 90, 200 - 30 * i)), 3136, 50176)
                  for i in range(n_img)] if size else []
        content = [{"type": "image"}] * n_img + [{"type": "text", "text": f"question {k}"}]
        text = policy.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                    chat_template=CHAT_TEMPLATE, tokenize=False,
                                                    add_generation_prompt=True)
        pv, grid = process_images(policy, images)
        prompt = encode_text_with_images(policy, text, grid.tolist() if grid is not None else [])
        resp = torch.randint(0, 800, (resp_len,), generator=rng).tolist()
        mask = [0] * len(prompt) + [1] * resp_len
        mask[len(prompt) + 2] = 0  # an observation-like hole inside the response
        exs.append(make_example(policy.model, prompt + resp, mask,
                                advantage=[0.9, -1.1, 0.3, -0.4][k], pixel_values=pv, image_grid_thw=grid))
    return exs


def _loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def test_packed_equals_padded_loss_and_grads(policy):
    model = policy.model
    exs = _examples(policy)
    total = sum(float(e.loss_mask[1:].sum()) for e in exs)

    def packed_loss():
        out = 0.0
        for b in plan_micro_batches([len(e) for e in exs], budget=400):
            pk = pack([exs[i] for i in b])
            logp, _ = packed_forward(model, pk)
            out = out + clipped_policy_loss(logp, logp.detach(), pk.advantages, pk.target_mask, 0.2).pg_loss_sum
        return out / total

    def padded_loss():
        out = 0.0
        for e, logp in zip(exs, padded_forward(model, exs, policy.pad_id)):
            tm = torch.cat([e.loss_mask[1:], torch.zeros(1)])
            adv = torch.full_like(logp, e.advantage)
            out = out + clipped_policy_loss(logp, logp.detach(), adv, tm, 0.2).pg_loss_sum
        return out / total

    lp, gp = _loss_and_grads(model, packed_loss)
    ld, gd = _loss_and_grads(model, padded_loss)
    assert len(plan_micro_batches([len(e) for e in exs], budget=400)) >= 2  # really packed several rows
    assert torch.isfinite(lp) and abs(lp.item()) > 1e-4
    assert abs(lp.item() - ld.item()) / abs(ld.item()) < 1e-5
    assert gp.keys() == gd.keys() and len(gp) > 20
    num = max((gp[n] - gd[n]).abs().max().item() for n in gp)
    den = max(gd[n].abs().max().item() for n in gd)
    assert num / den < 1e-5


def test_packed_logprobs_match_single_sequence_forward(policy):
    exs = _examples(policy)
    with torch.no_grad():
        lp_packed, _ = packed_forward(policy.model, pack(exs))
        singles = [packed_forward(policy.model, pack([e]))[0] for e in exs]
    assert torch.allclose(lp_packed, torch.cat(singles), atol=1e-5)


def test_behaviour_logprobs_pack_shifted_and_fresh_samples_are_marked():
    """Off-policy examples' engine log-probs pack like old_logp (shifted to their targets); a fresh
    example in the same row is NaN (weight 1 in the loss); an all-fresh row packs None."""
    from trainer.packing import Example

    def ex(n, beh=None):
        return Example(torch.arange(n), torch.ones(n), 1.0, None, None, torch.zeros(3, n, dtype=torch.long),
                       behaviour_logp=beh)

    fresh, off = ex(3), ex(4, torch.tensor([0.0, -1.0, -2.0, -3.0]))
    assert pack([fresh, ex(2)]).behaviour_logp is None
    got = pack([fresh, off]).behaviour_logp
    assert torch.isnan(got[:3]).all() and got[3:].tolist() == [-1.0, -2.0, -3.0, 0.0]
