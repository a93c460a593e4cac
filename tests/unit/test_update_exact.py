"""`trainer.loop.update` on the tiny model with a fixed seed: the loss and grad norm of one update
equal an independent plain-PyTorch reference (torchtune-style exact-value test).

The reference shares nothing with the trainer's path but the model: one sequence per forward, no
packing, positions computed by the model itself from `mm_token_type_ids`, the PPO-clip surrogate
written out here, the grad norm summed by hand before clipping. Two micro-batches and a mix of
clipped, unclipped, positive and negative advantages make a wrong normalisation, a wrong shift
or a wrong clip side show.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_prompts import image_prompt

from deepeyes.config import load_config
from deepeyes.policy import load_policy
from trainer.loop import update
from trainer.metrics import UpdateStats
from trainer.packing import make_example

EPS = 0.2


@pytest.fixture(scope="module")
def setup(tiny_policy_dir):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    policy = load_policy(tiny_policy_dir, trainable=True)
    g = torch.Generator().manual_seed(1)
    seqs = []
    for i, (size, n_resp, adv) in enumerate([((120, 90), 9, 1.5), (None, 12, -0.7), ((60, 200), 7, 0.4)]):
        prompt, _, pv, grid = image_prompt(policy, [size] if size else [], f"what is shown {i}?", i)
        response = torch.randint(10, 900, (n_resp,), generator=g).tolist()
        mask = [0] * len(prompt) + [1] * n_resp
        mask[len(prompt) + 2] = 0  # an observation token inside the response
        # behaviour log-probs: the current ones shifted by noise, so some ratios leave [0.8, 1.2]
        noise = 0.4 * torch.randn(len(prompt) + n_resp, generator=g)
        seqs.append(dict(ids=prompt + response, mask=mask, adv=adv, pv=pv, grid=grid, noise=noise))
    return policy, seqs


def reference_logp(model, s) -> torch.Tensor:
    """log p(token t | tokens < t) for t >= 1 (index t-1), one sequence, the model's own positions."""
    ids = torch.tensor([s["ids"]])
    mm = (ids == int(model.config.image_token_id)).to(torch.int32)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=s["pv"],
                image_grid_thw=s["grid"], mm_token_type_ids=mm, use_cache=False)
    logp = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)
    return logp.gather(-1, ids[0, 1:, None]).squeeze(-1)


def test_one_update_equals_a_plain_pytorch_reference(setup):
    policy, seqs = setup
    cfg = load_config(overrides=["trainer.micro_batch_tokens=160", "trainer.grad_clip=1000",
                                 f"trainer.clip_eps={EPS}", "trainer.lr=1e-3"])
    with torch.no_grad():
        old = [reference_logp(policy.model, s) + s["noise"][1:] for s in seqs]

    # the reference: per-token PPO-clip, token-mean over all policy tokens, hand-made grad norm
    ref_model = copy.deepcopy(policy.model)
    total_tokens = sum(sum(s["mask"][1:]) for s in seqs)
    loss_sum = torch.zeros(())
    for s, o in zip(seqs, old):
        lp = reference_logp(ref_model, s)
        m = torch.tensor(s["mask"][1:], dtype=torch.float32)
        r = torch.exp(lp - o)
        a = s["adv"]
        # PPO's pessimistic bound: for A >= 0 the ratio counts up to 1+eps, for A < 0 down to 1-eps
        per_tok = -a * (torch.clamp(r, max=1 + EPS) if a >= 0 else torch.clamp(r, min=1 - EPS))
        loss_sum = loss_sum + (per_tok * m).sum()
    (loss_sum / total_tokens).backward()
    ref_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in ref_model.parameters() if p.grad is not None))

    # the trainer's update on its packed micro-batches
    model = copy.deepcopy(policy.model)
    examples = []
    for s, o in zip(seqs, old):
        ex = make_example(model, s["ids"], s["mask"], s["adv"], s["pv"], s["grid"])
        ex.old_logp = torch.cat([o.new_zeros(1), o])  # per token t, as behaviour_logprobs stores it
        examples.append(ex)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.trainer.lr, weight_decay=0.0)
    st: UpdateStats = update(model, opt, examples, cfg, float(total_tokens), 1.0, lambda m: None)

    assert st.micro_batches == 2 and st.tokens == total_tokens
    assert st.pg_loss / st.tokens == pytest.approx(float(loss_sum) / total_tokens, rel=1e-5, abs=1e-7)
    assert st.grad_norm == pytest.approx(float(ref_norm), rel=1e-4)
    assert 0 < st.clipped < st.tokens  # the noise put some tokens outside the clip range
    # the optimizer stepped on those gradients: the same AdamW step on the reference moves alike
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=cfg.trainer.lr, weight_decay=0.0)
    ref_opt.step()
    worst = max((a - b).abs().max().item() for a, b in zip(model.parameters(), ref_model.parameters()))
    # Adam's first step is lr * g / (|g| + 1e-8): for gradients near 1e-8 float rounding moves it
    # by a fraction of lr (measured 2e-5 at lr 1e-3); a wrong gradient would move it by ~2 lr.
    assert worst < 0.05 * cfg.trainer.lr, worst


def test_old_logprobs_from_the_update_forward_equal_a_separate_pass(setup):
    """Issue 13 item 1: with one update on fresh samples, taking the old log-probs from the
    update's own forward (trainer.old_logprob_pass=auto) gives the loss, gradient, parameters and
    agreement metric of the separate teacher-forced pass it replaces (=always), and a second
    update on the same batch uses the first one's (pre-step) log-probs, not its own."""
    from trainer.loop import behaviour_logprobs

    policy, seqs = setup
    cfg = load_config(overrides=["trainer.micro_batch_tokens=160", "trainer.lr=1e-3"])

    def run(separate: bool, updates: int = 1):
        model = copy.deepcopy(policy.model)
        examples = [make_example(model, s["ids"], s["mask"], s["adv"], s["pv"], s["grid"]) for s in seqs]
        if separate:
            model.eval()
            behaviour_logprobs(model, examples, cfg.trainer.micro_batch_tokens, 1.0)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.trainer.lr, weight_decay=0.0)
        total = float(sum(sum(s["mask"][1:]) for s in seqs))
        stats = [update(model, opt, examples, cfg, total, 1.0, lambda m: None) for _ in range(updates)]
        return model, examples, stats

    fused_model, fused_ex, (fused,) = run(separate=False)
    pass_model, pass_ex, (sep,) = run(separate=True)
    assert fused.pg_loss == pytest.approx(sep.pg_loss, rel=1e-5)
    assert fused.grad_norm == pytest.approx(sep.grad_norm, rel=1e-5)
    assert fused.clipped == sep.clipped == 0  # the ratio is 1 on fresh samples
    for a, b in zip(fused_ex, pass_ex):  # the agreement metric reads these
        m = a.loss_mask.bool()
        assert torch.allclose(a.old_logp[m], b.old_logp[m], atol=1e-5)
    worst = max((a - b).abs().max().item() for a, b in zip(fused_model.parameters(), pass_model.parameters()))
    assert worst < 0.05 * cfg.trainer.lr, worst

    # two updates: the second one's ratio moves away from 1 against the first forward's log-probs
    _, _, (first, second) = run(separate=False, updates=2)
    _, _, (first_p, second_p) = run(separate=True, updates=2)
    assert second.pg_loss == pytest.approx(second_p.pg_loss, rel=1e-4)
    assert second.grad_norm == pytest.approx(second_p.grad_norm, rel=1e-3)
    # the policy did move (a second update that took its own forward would repeat the first loss)
    assert second.pg_loss != pytest.approx(first.pg_loss, rel=1e-2)
