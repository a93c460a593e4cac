"""The run viewer in a real browser, on a run folder written by the trainer's own writers.

`python -m trainer view` runs as its own server process (started and stopped by its pid) on a
tiny run folder that this test writes with MetricsSink and write_trajectories from real
Trajectory records, PIL images and the real crop tool. Headless Chromium (Debian's `chromium` and
`chromium-driver`, installed by scripts/setup.sh), driven by selenium, loads the page; the test
checks the DOM (steps, episodes, boxes on the image, crops, highlighted turns, filters, the group
view, a step that lands while the page is open) and saves a screenshot in its temp folder. Every
request for a path outside the run folder is a 404. No Ray.
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from viewer_support import CHROMEDRIVER, CHROMIUM, browser, call, raw_get, serving, wait_for  # noqa: F401 (browser: a fixture)
from deepeyes.contracts import RewardResult
from services.rollout.trajectory import ToolCallRecord, Trajectory
from services.tools.zoom import crop_image
from trainer.grpo import group_advantages
from trainer.metrics import MetricsSink, episode_summary, trajectory_metrics, write_trajectories

OBSERVATION = "<|im_start|>user\n<tool_response>(the crop)</tool_response><|im_end|>\n<|im_start|>assistant\n"
TARGET = [150, 80, 190, 110]  # the red flag, in the model frame (= the stored image here)
pytestmark = pytest.mark.timeout(180)

if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)) and not os.environ.get("CI"):
    pytest.skip("needs Debian's chromium and chromium-driver (scripts/setup.sh installs them)",
                allow_module_level=True)


def decode(ids: list[int]) -> str:  # the run's "tokenizer": one token per character
    return "".join(map(chr, ids))


def scene() -> Image.Image:
    im = Image.new("RGB", (280, 168), (235, 235, 225))
    draw = ImageDraw.Draw(im)
    draw.rectangle([20, 120, 260, 160], fill=(90, 140, 60))
    draw.rectangle(TARGET, fill=(210, 30, 30))
    return im


def episode(uid: str, turns: list[str], answer: str | None, ground_truth: str = "red") -> Trajectory:
    """One agent-loop episode: each turn's <tool_call> goes through the real crop tool; the reward
    is docs/design.md "Reward"'s for the answer given (None: no answer tags, a format error)."""
    original = scene()
    images, records, response, mask = [original], [], [], []
    for k, text in enumerate(turns):
        response += [ord(c) for c in text]
        mask += [1] * len(text)
        if "<tool_call>" in text:
            args = json.loads(text.split("<tool_call>")[1].split("</tool_call>")[0])["arguments"]
            result = crop_image(original, args)
            records.append(ToolCallRecord(k, "image_zoom_in_tool", args, result.ok, result.text))
            if result.ok:
                images.append(result.image)
            response += [ord(c) for c in OBSERVATION]
            mask += [0] * len(OBSERVATION)
    acc = float(answer == ground_truth)
    fmt = -1.0 if answer is None else 0.0
    tool = float(acc == 1.0 and len(images) > 1)
    step, row, _ = uid[1:].split("-")
    return Trajectory(uid=uid, group_id=f"s{step}-{row}", prompt_ids=[0] * 40, response_ids=response, loss_mask=mask,
                      logprobs=[0.0] * len(response), images=images, image_grid_thw=[[1, 2, 2]] * len(images),
                      response_text="\n".join(turns), tool_calls=records, num_turns=1 + len(turns) + len(images) - 1,
                      policy_version=int(step), finish_reason="answer" if answer else "length",
                      reward=RewardResult(0.8 * acc + 0.2 * fmt + 1.2 * tool, acc, fmt, tool, answer=answer),
                      question="What colour is the flag on the roof?", ground_truth=ground_truth,
                      extra={"target_bbox": TARGET, "orig_size": [280, 168]})


def step_episodes(step: int) -> list[Trajectory]:
    s = f"s{step}"
    return [
        # group row 0: zoom to the flag and answer right; a box with x1 > x2, then wrong; no
        # answer tags (format error); right without the tool
        episode(f"{s}-0-0", ["<think>The flag is small.</think>" + call([140, 70, 200, 120]),
                             "<think>It is red.</think><answer>red</answer>"], "red"),
        episode(f"{s}-0-1", [call([200, 30, 120, 60]), "<answer>green</answer>"], "green"),
        episode(f"{s}-0-2", ["<think>a roof, a flag</think> it might be red"], None),
        episode(f"{s}-0-3", ["<answer>red</answer>"], "red"),
        # group row 1: two crops then right; wrong without the tool
        episode(f"{s}-1-0", [call([0, 100, 280, 168]), call([150, 80, 190, 110]), "<answer>red</answer>"], "red"),
        episode(f"{s}-1-1", ["<answer>blue</answer>"], "blue"),
    ]


def write_step(run: Path, sink: MetricsSink, step: int, image_kb: int = 1024) -> list[Trajectory]:
    """What trainer/worker.py writes after a step: the metric row, then the saved episodes."""
    trajs = step_episodes(step)
    adv = group_advantages([t.reward.score for t in trajs], [t.group_id for t in trajs])
    sink.write(step, trajectory_metrics([episode_summary(t) for t in trajs]))
    write_trajectories(run / "trajectories" / f"step_{step:06d}.jsonl", trajs, adv, 8, decode, image_kb)
    return trajs


@pytest.fixture
def run_folder(tmp_path):
    run = tmp_path / "run"
    (run / "trajectories").mkdir(parents=True)
    sink = MetricsSink(run, tensorboard=False, ray_metrics=False)
    write_step(run, sink, 1)
    write_step(run, sink, 2, image_kb=0)  # the image budget spent: boxes drawn on a blank frame
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "reward/sco')  # the trainer is writing step 3 right now
    (tmp_path / "secret.txt").write_text("outside the run folder")
    (run / "leak.txt").symlink_to(tmp_path / "secret.txt")
    (run / "trajectories" / "outside").symlink_to(tmp_path)
    (run / "latest.jsonl").symlink_to(run / "trajectories" / "step_000002.jsonl")  # stays inside: served
    return {"run": run, "sink": sink, "secret": tmp_path / "secret.txt"}


@pytest.fixture
def viewer(run_folder):
    with serving(run_folder["run"]) as server:
        yield {**run_folder, **server}


def test_paths_outside_the_run_folder_are_404(viewer):
    port, secret = viewer["port"], viewer["secret"]
    escapes = [
        "/files/../secret.txt", "/files/../../secret.txt", "/files/trajectories/../../secret.txt",
        "/files/%2e%2e/secret.txt", "/files/%2E%2E%2Fsecret.txt", "/files/..%2fsecret.txt",
        "/files/%252e%252e/secret.txt", "/files/" + str(secret), "/files//" + str(secret).lstrip("/"),
        "/files/%2F" + str(secret).lstrip("/").replace("/", "%2F"),
        "/files/leak.txt", "/files/trajectories/outside/secret.txt",  # symlinks leading out
        "/files/trajectories", "/files/", "/files/trajectories/step_000001.jsonl%00",
        "/static/../secret.txt", "/static/..%2f..%2fapp.py", "/static/%2e%2e%2fapp.py", "/static/app.py",
        "/../secret.txt", "/api/steps/..%2f..%2fsecret", "/%2e%2e/secret.txt",
    ]
    answers = {path: raw_get(port, path) for path in escapes}
    assert {p: s for p, (s, _) in answers.items() if s != 404} == {}
    assert not any(b"outside the run folder" in body for _, body in answers.values())
    # what is inside is served, symlinks that stay inside included
    status, body = raw_get(port, "/files/latest.jsonl")
    assert status == 200 and body == (viewer["run"] / "trajectories" / "step_000002.jsonl").read_bytes()
    assert raw_get(port, "/files/trajectories/step_000001/s1-0-0_1.jpg")[0] == 200
    assert raw_get(port, "/static/viewer.js")[0] == 200


def test_api_reads_a_run_being_written(viewer):
    def steps() -> list[dict]:
        return json.loads(urllib.request.urlopen(viewer["url"] + "api/run", timeout=5).read())["steps"]

    assert [(s["step"], s["saved"]) for s in steps()] == [(1, 6), (2, 6)]  # step 3's half line left out
    assert steps()[0]["reward/acc"] == pytest.approx(3 / 6)
    with (viewer["run"] / "trajectories" / "step_000003.jsonl").open("w") as f:
        f.write('{"uid": "s3-0-0"}\n{"uid": "s3-0-')  # one whole line, one being written
    assert [(s["step"], s["saved"]) for s in steps()][-1] == (3, 1)


def test_page_in_headless_chromium(viewer, browser, tmp_path):
    from selenium.webdriver.common.by import By

    def find(css: str, root=None) -> list:
        return (root or browser).find_elements(By.CSS_SELECTOR, css)

    def attrs(css: str, name: str) -> list[str]:  # read in one script: the page may re-render meanwhile
        return browser.execute_script(
            "return [...document.querySelectorAll(arguments[0])].map(e => e.getAttribute(arguments[1]))", css, name)

    def shown_uids() -> list[str]:
        return attrs("article.episode", "data-uid")

    browser.get(viewer["url"] + "#step=1")
    wait_for(lambda: len(find("article.episode")) == 6, what="the 6 episodes of step 1")
    assert attrs("#steps tbody tr", "data-step") == ["1", "2"]
    assert find("#steps tr.selected")[0].get_attribute("data-step") == "1"
    assert [td.text for td in find("#steps tbody tr:first-child td")] == ["1", "0.77", "0.50", "0.67", "6"]

    # boxes on the image: valid (a crop came back) and rejected told apart, in the model frame
    first = find("article[data-uid='s1-0-0']")[0]
    valid = find("rect.box.valid", first)
    assert [[valid[0].get_attribute(k) for k in ("x", "y", "width", "height")]] == [["140", "70", "60", "50"]]
    assert len(find("rect.box.valid")) == 3 and len(find("rect.box.rejected")) == 1
    assert len(find("article[data-uid='s1-0-1'] rect.box.rejected")) == 1
    assert len(find("rect.target")) == 6
    # ... and where the browser draws it: over the flag's place in the displayed image
    img, box = find("img.original", first)[0], valid[0]
    i, b = img.rect, box.rect
    scale = i["width"] / 280
    assert abs(b["x"] - i["x"] - 140 * scale) < 3 and abs(b["width"] - 60 * scale) < 3
    assert abs(b["y"] - i["y"] - 70 * scale) < 3 and abs(b["height"] - 50 * scale) < 3
    # the original and the crops were served and decoded by the browser
    loaded = browser.execute_script(
        "return [...document.querySelectorAll('img')].map(im => im.complete && im.naturalWidth > 0)")
    assert len(loaded) == 6 + 3 and all(loaded)
    assert len(find(".crops img")) == 3  # 1 crop of s1-0-0, 2 of s1-1-0
    # turns: tool calls and answers highlighted; the observations shown as tool turns
    assert [s.text for s in find(".turn .answer", first)] == ["<answer>red</answer>"]
    assert len(find(".turn .call", first)) == 1 and len(find(".turn.tool", first)) == 1
    assert "advantage" in first.text and "policy v1" in first.text

    # filters change the list
    def pick(css: str) -> None:
        find(css)[0].click()

    pick("input[name=outcome][value=correct]")
    assert shown_uids() == ["s1-0-0", "s1-0-3", "s1-1-0"]
    pick("input[name=outcome][value=wrong]")
    assert shown_uids() == ["s1-0-1", "s1-0-2", "s1-1-1"]
    pick("input[name=outcome][value=format]")
    assert shown_uids() == ["s1-0-2"]
    pick("input[name=outcome][value=all]")
    pick("input[name=tool]")
    assert shown_uids() == ["s1-0-0", "s1-0-1", "s1-1-0"]
    assert "3 of 6" in find("#count")[0].text
    pick("input[name=tool]")

    # the group view: the samples of each prompt side by side, best advantage first
    pick("input[name=view][value=groups]")
    groups = find("section.group")
    assert [g.get_attribute("data-group") for g in groups] == ["s1-0", "s1-1"]
    saved = [json.loads(line) for line in (viewer["run"] / "trajectories" / "step_000001.jsonl").read_text().splitlines()]
    by_adv = sorted((r for r in saved if r["group_id"] == "s1-0"), key=lambda r: -r["advantage"])
    assert [a.get_attribute("data-uid") for a in find("article.episode", groups[0])] == [r["uid"] for r in by_adv]
    assert [b.text for b in find(".badge.advantage", groups[0])] == [f"advantage {r['advantage']:.2f}" for r in by_adv]
    assert "4 saved of the 4 samples" in find("h2", groups[0])[0].text
    browser.save_screenshot(str(tmp_path / "viewer-groups.png"))
    pick("input[name=view][value=episodes]")
    assert "view=episodes" in browser.current_url and "step=1" in browser.current_url

    # another step: its images were over the budget, the boxes are drawn all the same
    find("#steps tr[data-step='2']")[0].click()
    wait_for(lambda: shown_uids() and shown_uids()[0].startswith("s2-"), what="step 2's episodes")
    assert len(find("img.original")) == 0 and len(find(".frame .missing")) == 6
    assert len(find("rect.box.valid")) == 3

    # the run goes on while the page is open: step 3 lands and shows up without a reload
    with (viewer["run"] / "metrics.jsonl").open("a") as f:
        f.write('re": 0.5}\n')  # the half-written line of the fixture, finished
    write_step(viewer["run"], viewer["sink"], 3)
    wait_for(lambda: attrs("#steps tbody tr", "data-step") == ["1", "2", "3"],
             timeout=15, what="step 3 in the step list")
    find("#steps tr[data-step='3']")[0].click()
    wait_for(lambda: len(find("img.original")) == 6, what="step 3's images")

    # offline: every resource the page loaded came from the viewer itself
    sources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert sources and all(s.startswith(viewer["url"]) for s in sources), sources
    shot = tmp_path / "viewer.png"
    browser.save_screenshot(str(shot))
    assert Image.open(shot).size[0] >= 1000 and shot.stat().st_size > 20_000
