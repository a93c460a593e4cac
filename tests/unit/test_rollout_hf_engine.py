"""The HF engine on the tiny model: batching changes nothing, log-probs match a teacher-forced pass."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
import torch
from PIL import Image

from deepeyes.chat import SYSTEM_PROMPT
from deepeyes.config import RolloutConfig, ToolsConfig
from deepeyes.policy import encode_text_with_images, load_policy
from services.rollout.agent_loop import run_episode
from services.rollout.engines import SamplingParams
from services.rollout.hf_engine import HFEngine
from services.rollout.logprobs import sequence_logprobs
from services.rollout.types import EpisodeRequest, PolicyIO

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def policy(tiny_policy_dir):
    return load_policy(tiny_policy_dir)


def prompt(policy, n_words, color, size):
    img = Image.new("RGB", size, color)
    grid = policy.image_processor(images=[img], return_tensors="pt")["image_grid_thw"].tolist()
    text = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" + "what " * n_words
            + "<|im_end|>\n<|im_start|>assistant\n")
    return encode_text_with_images(policy, text, grid), [img]


def test_batched_left_padded_equals_unbatched(policy):
    eng = HFEngine(policy)
    reqs = [prompt(policy, 3, "red", (100, 60)) + (SamplingParams(16, 1.0, seed=1, stop_token_ids=[policy.eos_id]),),
            prompt(policy, 40, "blue", (300, 200)) + (SamplingParams(9, 0.7, top_k=50, top_p=0.9, seed=2),),
            prompt(policy, 10, "green", (56, 56)) + (SamplingParams(16, 0.0),)]
    batched = eng.generate_batch_sync(reqs)
    for req, b in zip(reqs, batched):
        alone = eng.generate_batch_sync([req])[0]
        assert alone.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(alone.logprobs, b.logprobs)) < 1e-4
    assert len(batched[1].token_ids) == 9 and batched[1].finish_reason == "length"  # own cap, truncated
    # a seed fixes the sample; another seed gives another one
    again = eng.generate_batch_sync([reqs[0]])[0]
    other = eng.generate_batch_sync([reqs[0][:2] + (SamplingParams(16, 1.0, seed=7, stop_token_ids=[policy.eos_id]),)])[0]
    assert again.token_ids == batched[0].token_ids and other.token_ids != again.token_ids


def test_greedy_is_the_argmax_of_a_plain_forward(policy):
    ids, imgs = prompt(policy, 5, "red", (100, 60))
    out = HFEngine(policy).generate_batch_sync([(ids, imgs, SamplingParams(1, 0.0))])[0]
    proc = policy.image_processor(images=imgs, return_tensors="pt")
    t = torch.tensor([ids])
    with torch.no_grad():
        logits = policy.model(input_ids=t, attention_mask=torch.ones_like(t), pixel_values=proc["pixel_values"],
                              image_grid_thw=proc["image_grid_thw"],
                              mm_token_type_ids=(t == policy.image_pad_id).int()).logits[0, -1]
    assert out.token_ids == [int(logits.argmax())]
    assert abs(out.logprobs[0] - float(torch.log_softmax(logits, -1).max())) < 1e-4


def test_banned_tokens_are_never_chosen_but_keep_their_logprob_mass():
    from services.rollout.engines import sample_token

    logits = torch.tensor([0.0, 5.0, 1.0, 0.5])
    tok, lp = sample_token(logits, SamplingParams(1, 0.0, banned_token_ids=[1]), None)
    assert tok == 2 and abs(lp - float(torch.log_softmax(logits, -1)[2])) < 1e-6
    gen = torch.Generator().manual_seed(0)
    picks = {sample_token(logits, SamplingParams(1, 1.0, banned_token_ids=[1]), gen)[0] for _ in range(200)}
    assert 1 not in picks and picks == {0, 2, 3}


@dataclass
class FakeToolResult:
    ok: bool
    text: str
    image: Image.Image | None = None


async def fake_crop(name, image, arguments):  # the tiny random model never calls it in practice
    return FakeToolResult(True, "zoomed", image.crop((0, 0, 56, 56)))


def test_episode_logprobs_match_teacher_forcing_batched(policy):
    """Episodes sampled concurrently (dynamically batched) vs one right-padded teacher-forced pass."""
    io = PolicyIO.from_policy(policy)
    engine = HFEngine(policy, max_batch_size=8, batch_wait_ms=20)
    cfg = RolloutConfig(max_response_length=64, max_new_tokens_per_turn=24, temperature=0.8)
    sizes = [(300, 200), (100, 60), (56, 90), (200, 200)]

    async def main():
        reqs = [EpisodeRequest(uid=f"e{i}", group_id="g", messages=[
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what " * (1 + 7 * i)}]}],
            images=[Image.new("RGB", sizes[i], ["red", "blue", "green", "white"][i])], seed=i) for i in range(4)]
        return await asyncio.gather(*(run_episode(r, policy_io=io, generate=engine.generate, call_tool=fake_crop,
                                                  score=None, cfg=cfg, tools_cfg=ToolsConfig(),
                                                  tool_schemas=[]) for r in reqs))

    trajs = asyncio.run(main())
    assert max(engine.batch_sizes) >= 2  # the four first turns shared a forward
    L = max(len(t.input_ids) for t in trajs)
    ids = torch.full((4, L), policy.pad_id)
    mask = torch.zeros((4, L), dtype=torch.long)
    for b, t in enumerate(trajs):  # RIGHT padding, as the trainer packs
        ids[b, :len(t.input_ids)] = torch.tensor(t.input_ids)
        mask[b, :len(t.input_ids)] = 1
    proc = policy.image_processor(images=[im for t in trajs for im in t.images], return_tensors="pt")
    with torch.no_grad():
        lp = sequence_logprobs(policy.model, ids, mask, proc["pixel_values"], proc["image_grid_thw"], temperature=0.8)
    worst = 0.0
    for b, t in enumerate(trajs):
        ref = lp[b, len(t.prompt_ids):len(t.input_ids)].tolist()
        assert len(t.logprobs) == len(ref) > 0
        for got, want, m in zip(t.logprobs, ref, t.loss_mask):
            if m:
                worst = max(worst, abs(got - want))
    assert worst < 1e-4, worst
    # the same pass with 1-D positions (no M-RoPE index) is visibly off: the check above has teeth
    with torch.no_grad():
        naive = torch.log_softmax(policy.model(input_ids=ids, attention_mask=mask, pixel_values=proc["pixel_values"],
                                               image_grid_thw=proc["image_grid_thw"]).logits[:, :-1].float() / 0.8, -1)
    naive = naive.gather(-1, ids[:, 1:, None]).squeeze(-1)
    t = trajs[0]
    gap = max(abs(naive[0, i - 1].item() - lp[0, i].item())
              for i in range(len(t.prompt_ids), len(t.input_ids)) if t.loss_mask[i - len(t.prompt_ids)])
    assert gap > 1e-3, gap


def test_check_health_reports_a_dead_batch_worker(policy):
    """The replica's health check has something that can fail: the batch worker dying."""
    eng = HFEngine(policy, batch_wait_ms=0.0)
    ids, imgs = prompt(policy, 3, "red", (56, 56))

    def boom(n: int) -> None:  # an observer that raises outside the per-batch error handling
        raise ValueError("observer broke")

    async def main():
        await eng.generate(ids, imgs, SamplingParams(2, 0.0))
        await eng.check_health()  # a live worker: healthy
        eng.on_batch = boom
        waiter = asyncio.ensure_future(eng.generate(ids, imgs, SamplingParams(2, 0.0)))
        while not eng._worker.done():
            await asyncio.sleep(0.01)
        with pytest.raises(RuntimeError, match="batch worker died: ValueError\\('observer broke'\\)"):
            await eng.check_health()
        waiter.cancel()

    asyncio.run(main())


def test_one_bad_request_fails_alone_and_its_batch_mates_succeed(policy):
    """Issue 12 item 1: a request that breaks the batched decode (here a NaN temperature that got
    past validation: multinomial raises) fails alone; its 7 batch mates get their own samples."""
    eng = HFEngine(policy, batch_wait_ms=500.0)
    reqs = [prompt(policy, 2 + i, "red", (56, 56)) + (SamplingParams(4, 1.0, seed=i),) for i in range(8)]
    bad = SamplingParams(4, 1.0, seed=99)
    bad.temperature = float("nan")  # what a batch saw before the boundary validated it
    reqs[3] = reqs[3][:2] + (bad,)

    async def main():
        return await asyncio.gather(*(eng.generate(*r) for r in reqs), return_exceptions=True)

    out = asyncio.run(main())
    assert isinstance(out[3], RuntimeError)
    for i, r in enumerate(reqs):
        if i != 3:
            assert out[i].token_ids == eng.generate_batch_sync([r])[0].token_ids
    assert eng.batch_sizes[8] == 1  # they did share one batch


def test_requests_join_a_running_decode_and_sample_as_alone(policy):
    """Continuous batching (issue 13): requests that arrive while a decode runs join it at the next
    token step; each still gets exactly the tokens (and log-probs) it gets alone, though its KV
    cache is merged into the running batch with another length of left padding."""
    eng = HFEngine(policy, batch_wait_ms=0.0)
    long_req = prompt(policy, 3, "red", (100, 60)) + (SamplingParams(300, 1.0, seed=5),)
    late = [prompt(policy, 25, "blue", (300, 200)) + (SamplingParams(12, 0.9, seed=6),),
            prompt(policy, 1, "green", (56, 56)) + (SamplingParams(6, 0.0),)]

    async def main():
        first = asyncio.ensure_future(eng.generate(*long_req))
        while not eng._lock or not eng._lock.locked():  # the first decode is running
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.02)
        rest = await asyncio.gather(*(eng.generate(*r) for r in late))
        return [await first, *rest]

    out = asyncio.run(main())
    assert eng.joined == 2 and sum(eng.batch_sizes.values()) == 1  # one decode, both joined it
    for req, got in zip([long_req, *late], out):
        alone = eng.generate_batch_sync([req])[0]
        assert got.token_ids == alone.token_ids
        assert max(abs(x - y) for x, y in zip(got.logprobs, alone.logprobs)) < 1e-4


def test_samples_of_one_prompt_share_its_prefill_and_sample_as_alone(policy):
    """The n samples of a GRPO prompt run the prompt's forward once (issue 13): the engine counts
    the shared rows, and each sample still gets exactly what it gets alone. Same ids with other
    pixels is another prompt: never shared."""
    eng = HFEngine(policy)
    ids, imgs = prompt(policy, 6, "red", (100, 60))
    other_pixels = Image.new("RGB", (100, 60), "blue")  # same size, so the same ids
    same = [(ids, [im.copy() for im in imgs], SamplingParams(10, 1.0, seed=s)) for s in range(4)]
    reqs = same + [(ids, [other_pixels], SamplingParams(10, 1.0, seed=0))]
    out = eng.generate_batch_sync(reqs)
    assert eng.prefill_shared == 3
    assert len({tuple(o.token_ids) for o in out[:4]}) > 1  # own seeds: the samples differ
    for req, got in zip(reqs, out):
        alone = eng.generate_batch_sync([req])[0]
        assert got.token_ids == alone.token_ids
        assert max(abs(x - y) for x, y in zip(got.logprobs, alone.logprobs)) < 1e-4
    assert eng.prefill_shared == 3  # nothing to share alone
