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

import contextlib
import http.client
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from raycli import REPO, free_port
from deepeyes.contracts import RewardResult
from services.rollout.trajectory import ToolCallRecord, Trajectory
from services.tools.zoom import crop_image
from trainer.grpo import group_advantages
from trainer.metrics import MetricsSink, episode_summary, trajectory_metrics, write_trajectories

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
OBSERVATION = "<|im_start|>user\n<tool_response>(the crop)</tool_response><|im_end|>\n<|im_start|>assistant\n"
TARGET = [150, 80, 190, 110]  # the red flag, in the model frame (= the stored image here)
pytestmark = pytest.mark.timeout(180)

if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)) and not os.environ.get("CI"):
    pytest.skip("needs Debian's chromium and chromium-driver (scripts/setup.sh installs them)",
                allow_module_level=True)


def decode(ids: list[int]) -> str:  # the run's "tokenizer": one token per character
    return "".join(map(chr, ids))


def call(box: list[float]) -> str:
    return '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": %s}}</tool_call>' % json.dumps(box)


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
    """What trainer/loop.py writes after a step: the metric row, then the saved episodes."""
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


@contextlib.contextmanager
def serving(folder: Path):
    """The viewer of `folder` as a server process of its own on a free loopback port; stopped by its pid."""
    port = free_port()
    log_path = folder.parent / f"viewer-{folder.name}.log"
    log = log_path.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "view", str(folder), "--port", str(port)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                urllib.request.urlopen(url + "api/run", timeout=2).read()
                break
            except OSError:
                assert time.monotonic() < deadline, "the viewer did not answer within 60 s"
                time.sleep(0.2)
        yield {"url": url, "port": port}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def viewer(run_folder):
    with serving(run_folder["run"]) as server:
        yield {**run_folder, **server}


def raw_get(port: int, path: str) -> tuple[int, bytes]:
    """GET `path` byte for byte as given (no client-side normalisation of `..` or escapes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


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


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1100"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(check, timeout: float = 20.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


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


# ---------------------------------------------------------------------------------------------
# an evaluation folder (`python -m trainer eval --out DIR`), written without Ray by the harness's
# own writer (ItemsWriter, run_items' on_record), outcome_from, summarize and render_eval_bars

FRAME = (300, 225)  # the model frame of the twins' 1200x900 / 1600x900 images in this test


def eval_episode(item, prompt, mode: str, s: int, original: Image.Image, frame: Image.Image,
                 calls: list[list[float]], answer: str) -> Trajectory:
    """One scripted eval episode: its tool calls through the real crop tool (cut from the original
    at the box mapped from the frame, as `eval` does), then `answer`."""
    images, records, turns = [frame], [], []
    for k, box in enumerate(calls):
        args = {"bbox_2d": box, "label": "square"}
        result = crop_image(original, args, frame_size=frame.size)
        records.append(ToolCallRecord(k, "image_zoom_in_tool", args, result.ok, result.text))
        if result.ok:
            images.append(result.image)
        turns.append(call(box))
    turns.append(f"<answer>{answer}</answer>")
    text = "\n".join(turns)
    return Trajectory(uid=f"{item.benchmark}-{mode}-{item.id}-{s}", group_id=f"{item.benchmark}-{mode}-{item.id}",
                      prompt_ids=[0] * 8, response_ids=[1] * len(text), loss_mask=[1] * len(text),
                      logprobs=[0.0] * len(text), images=images, image_grid_thw=[[1, 2, 2]] * len(images),
                      response_text=text, tool_calls=records, num_turns=2 + 2 * len(calls), finish_reason="answer",
                      question=prompt.text, ground_truth=prompt.reference,
                      extra={"target_bbox": item.target_bbox, "orig_size": list(original.size)})


def zoom_box(item, original: Image.Image) -> list[float]:
    """A box round the item's target square (HR-Bench has none: the middle), in the model frame."""
    if item.target_bbox is None:
        return [130, 92, 170, 132]
    sx, sy = FRAME[0] / original.width, FRAME[1] / original.height
    x1, y1, x2, y2 = item.target_bbox
    cx, cy = (x1 + x2) / 2 * sx, (y1 + y2) / 2 * sy
    return [round(cx - 20), round(cy - 20), round(cx + 20), round(cy + 20)]


def write_eval_folder(out: Path, image_kb: int = 1024) -> dict:
    """What `python -m trainer eval --twins` writes, for a scripted policy. On vstar (3 items, k=2):
    item 0 right in every tool sample (one zoom on the target) and in no_tool sample 0 only; item 1
    right in tool sample 0 (a zoom), wrong in tool sample 1 (a rejected box, then a wrong letter)
    and in both no_tool samples; item 2 wrong everywhere, no call. hrbench_4k: 2 items, one sample
    lost (a failed episode), an answer naming no option (scored by the judge)."""
    from trainer.eval.records import ItemsWriter, write_json
    from trainer.eval.items import LETTERS, read_hrbench, read_vstar
    from trainer.eval.protocol import decode_item_image, outcome_from, sample_prompt, summarize, failed_outcome
    from trainer.eval.twins import write_hrbench_twin, write_vstar_twin
    from trainer.plots import render_eval_bars

    vstar = list(read_vstar(write_vstar_twin(out / "twins" / "vstar_bench", 3, seed=0)))
    hr = list(read_hrbench(write_hrbench_twin(out / "twins" / "hr_bench_4k.tsv", 2, seed=0), "hrbench_4k"))
    results: dict = {}
    records: list[dict] = []
    with ItemsWriter(out, image_kb) as writer:
        def write(record: dict, traj) -> None:
            writer(record, traj)
            records.append(record)

        for bench, items in (("vstar", vstar), ("hrbench_4k", hr)):
            outcomes = []
            for i, item in enumerate(items):
                original, _ = decode_item_image(item)
                frame = original.resize(FRAME)
                for s in range(2):
                    prompt = sample_prompt(item, s, 0)
                    wrong = next(letter for letter in LETTERS[:len(prompt.shown)] if letter != prompt.correct_letter)
                    for mode in ("tool", "no_tool"):
                        if bench == "vstar":
                            right = (i == 0 and (mode == "tool" or s == 0)) or (i == 1 and mode == "tool" and s == 0)
                            calls = ([zoom_box(item, original)] if mode == "tool" and i == 0 else
                                     [zoom_box(item, original)] if mode == "tool" and i == 1 and s == 0 else
                                     [[200, 30, 120, 60]] if mode == "tool" and i == 1 else [])
                            answer = prompt.correct_letter if right else wrong
                        else:
                            if i == 1 and s == 1 and mode == "tool":  # the episode did not come back
                                out_, record = failed_outcome(item, prompt, mode, s)
                                outcomes.append(out_)
                                write(record, None)
                                continue
                            calls = [zoom_box(item, original)] if mode == "tool" else []
                            answer = "a square" if i == 0 and s == 0 else prompt.correct_letter
                        traj = eval_episode(item, prompt, mode, s, original, frame, calls, answer)
                        out_, record = outcome_from(traj, item, prompt, mode, s, lambda t, p: (False, True))
                        outcomes.append(out_)
                        write(record, traj)
            results[bench] = {m: summarize([o for o in outcomes if o.mode == m], 2) for m in ("tool", "no_tool")}
    render_eval_bars(results, out / "plots")
    write_json(out / "eval.json", {"model": "scripted", "benchmarks": results,
                                   "protocol": {"k": 2, "seed": 0, "greedy": True, "temperature": 0.0, "shuffle": True,
                                                "map_crops": True, "modes": ["tool", "no_tool"], "limit": 0,
                                                "judge": "rule", "matcher": "rule first"}})
    return {"results": results, "records": records, "vstar": [it.id for it in vstar], "hr": [it.id for it in hr],
            "categories": {it.id: it.category for it in vstar}}


def test_items_writer_keeps_bounded_thumbnails(tmp_path):
    """The harness's writer: every record gets its uid, question, frame and boxes; the thumbnails
    (one per item frame, shared by its samples and modes, then crops) stop at the budget."""
    full = write_eval_folder(tmp_path / "full", image_kb=1024)
    lines = [json.loads(line) for line in (tmp_path / "full" / "items.jsonl").read_text().splitlines()]
    assert lines == json.loads(json.dumps(full["records"], default=str))  # each record as handed over
    assert len(lines) == 2 * 2 * 3 + 2 * 2 * 2
    kept = [r for r in lines if r["scored_by"] != "failed"]
    assert all(r["images"][0]["width"] == FRAME[0] and r["question"].startswith(r["question"].split("\n")[0]) for r in kept)
    frames = {(r["benchmark"], r["item"]): r["images"][0]["file"] for r in kept}
    assert len(set(frames.values())) == 5 and all(frames.values())  # one per item
    for r in kept:
        assert (r["target_box"] is None) == (r["benchmark"] == "hrbench_4k")
        assert all(0 <= v <= FRAME[0] for v in r["target_box"] or [])
        for c in r["tool_calls"]:
            assert c["box"] == c["arguments"]["bbox_2d"] and (c["image"] is not None) == c["ok"]
    files = sorted(p.name for p in (tmp_path / "full" / "images").iterdir())
    crops = sum(1 for r in kept for c in r["tool_calls"] if c["image"])
    assert len(files) == 5 + crops and crops == 3 + 3  # vstar: 2 + 1 zooms; hrbench: 3 episodes with one
    # a budget of one frame: the first item's frame, nothing else (crops only within half of it)
    small = tmp_path / "small"
    one = (tmp_path / "full" / "images" / "item_000000.jpg").stat().st_size
    write_eval_folder(small, image_kb=(one + 1023) // 1024)
    assert [p.name for p in (small / "images").iterdir()] == ["item_000000.jpg"]
    write_eval_folder(tmp_path / "none", image_kb=0)
    assert not (tmp_path / "none" / "images").exists()
    none = [json.loads(line) for line in (tmp_path / "none" / "items.jsonl").read_text().splitlines()]
    assert all(r["images"][0]["file"] is None for r in none if r["scored_by"] != "failed")


def test_eval_folder_figures_while_running_match_the_harness(tmp_path):
    """Before eval.json lands the viewer computes each benchmark's figures from items.jsonl with the
    protocol's summarize: the same figures the harness then writes."""
    from trainer.view.app import RunFolder

    made = write_eval_folder(tmp_path / "eval")
    folder = RunFolder(tmp_path / "eval")
    final = folder.summary()
    assert final["kind"] == "eval" and final["eval"]["finished"]
    (tmp_path / "eval" / "eval.json").unlink()
    running = folder.summary()["eval"]
    assert not running["finished"]
    for b in running["benchmarks"]:
        for m in b["modes"]:
            want = made["results"][b["benchmark"]][m["mode"]]
            assert not m["final"] and m["saved"] == want["episodes"]
            for key in ("avg@k", "pass@k", "tool_use", "calls_per_episode", "items", "failed", "answered"):
                assert m[key] == pytest.approx(want[key]), (b["benchmark"], m["mode"], key)


@pytest.fixture
def eval_viewer(tmp_path):
    out = tmp_path / "eval"
    made = write_eval_folder(out)
    (tmp_path / "secret.txt").write_text("outside the eval folder")
    (out / "images" / "leak.jpg").symlink_to(tmp_path / "secret.txt")
    with serving(out) as server:
        yield {**made, **server, "out": out}


def test_eval_folder_in_headless_chromium(eval_viewer, browser, tmp_path):
    from selenium.webdriver.common.by import By

    port, url = eval_viewer["port"], eval_viewer["url"]
    for path in ("/files/images/../../secret.txt", "/files/images/leak.jpg", "/files/../secret.txt",
                 "/files/images/%2e%2e%2f%2e%2e%2fsecret.txt", "/api/eval/..%2f..%2fsecret.txt"):
        status, body = raw_get(port, path)
        assert b"outside the eval folder" not in body and (status == 404 or body == b"[]"), path
    assert raw_get(port, "/files/images/item_000000.jpg")[0] == 200
    run = json.loads(urllib.request.urlopen(url + "api/run", timeout=5).read())
    assert run["kind"] == "eval" and "steps" not in run

    def find(css: str, root=None) -> list:
        return (root or browser).find_elements(By.CSS_SELECTOR, css)

    def attrs(css: str, name: str) -> list[str]:
        return browser.execute_script(
            "return [...document.querySelectorAll(arguments[0])].map(e => e.getAttribute(arguments[1]))", css, name)

    def items() -> list[str]:
        return attrs("article.item", "data-item")

    def pick(css: str) -> None:
        find(css)[0].click()

    vstar = eval_viewer["vstar"]
    browser.get(url)
    wait_for(lambda: len(find("article.item")) == 3, what="the 3 vstar items")
    # the benchmarks and modes with their headline figures; the training parts hidden
    assert attrs("#benchmarks tbody tr", "data-bench") == ["vstar", "vstar", "hrbench_4k", "hrbench_4k"]
    assert attrs("#benchmarks tbody tr", "data-mode") == ["tool", "no_tool"] * 2
    first = [td.text for td in find("#benchmarks tbody tr:first-child td")]
    tool = eval_viewer["results"]["vstar"]["tool"]
    assert tool["avg@k"] == pytest.approx(0.5) and tool["pass@k"] == pytest.approx(2 / 3)
    assert first == ["tool", "0.500", "0.667", f"{tool['tool_use']:.2f}", f"{tool['calls_per_episode']:.2f}", "6"]
    assert not find("#steps")[0].is_displayed() and not find("#episodes")[0].is_displayed()
    assert items() == vstar
    # the per-benchmark bar chart, served and decoded
    wait_for(lambda: browser.execute_script("const p = document.querySelector('img.plot');"
                                            "return p && p.complete && p.naturalWidth > 0"), what="the plot")

    # per item the k samples side by side, a row per mode, told apart
    item0 = find(f"article[data-item='{vstar[0]}']")[0]
    assert [r.get_attribute("data-mode") for r in find(".mode-row", item0)] == ["tool", "no_tool"]
    tool_row, plain_row = find(".mode-row", item0)
    assert len(find(".sample", tool_row)) == 2 and len(find(".sample.mode-tool", tool_row)) == 2
    assert len(find(".sample.mode-no_tool", plain_row)) == 2
    assert "with the tool" in tool_row.text and "without the tool" in plain_row.text
    # the question, the shuffled options with the correct one and the one read, who scored it
    rec = next(r for r in eval_viewer["records"] if r["item"] == vstar[0] and r["mode"] == "tool" and r["sample"] == 0)
    sample = find(f".sample[data-uid='{rec['uid']}']")[0]
    assert [li.text for li in find(".options li", sample)] == [f"({'ABCD'[j]}) {o}" for j, o in enumerate(rec["options"])]
    assert find(".options li.truth.chosen", sample)[0].get_attribute("data-letter") == rec["correct_letter"]
    assert "scored by rule" in sample.text and "correct" in sample.text
    assert "What is the color of the small square?" in item0.text
    # the zoom drawn on the frame thumbnail where the model asked, its crop beside it
    box = find("rect.box.valid", sample)[0]
    assert [float(box.get_attribute(k)) for k in ("x", "width")] == [rec["boxes"][0][0], 40.0]
    assert len(find(".crops img", sample)) == 1 and len(find("rect.target", item0)) >= 1
    item1 = find(f"article[data-item='{vstar[1]}']")[0]
    assert len(find("rect.box.rejected", item1)) == 1 and len(find("rect.box.valid", item1)) == 1
    loaded = browser.execute_script(
        "return [...document.querySelectorAll('#items img')].map(im => im.complete && im.naturalWidth > 0)")
    assert len(loaded) == 3 + 2 * 3 + 1 and all(loaded)  # 3 item frames; per zoom its frame and crop; the rejected box its frame

    # filters change the list
    pick("input[name=e-outcome][value=correct]")
    assert items() == vstar[:2]
    pick("input[name=e-mode][value=no_tool]")
    assert items() == vstar[:1] and not find(".mode-row.mode-tool") and len(find(".mode-row.mode-no_tool")) == 1
    assert len(find(".sample.dim")) == 1  # its wrong no_tool sample, shown dimmed beside the right one
    pick("input[name=e-mode][value=both]")
    pick("input[name=e-outcome][value=wrong]")
    assert items() == vstar
    pick("input[name=e-outcome][value=all]")
    pick("input[name=e-tool]")
    assert items() == vstar[:2] and "2 of 3 items" in find("#e-count")[0].text
    pick("input[name=e-tool]")
    cat = eval_viewer["categories"][vstar[1]]
    from selenium.webdriver.support.ui import Select
    Select(find("select[name=e-cat]")[0]).select_by_value(cat)
    assert items() == [i for i in vstar if eval_viewer["categories"][i] == cat] and len(items()) < 3
    assert f"cat={cat}" in browser.current_url
    browser.save_screenshot(str(tmp_path / "viewer-eval-filtered.png"))
    Select(find("select[name=e-cat]")[0]).select_by_value("")

    # the other benchmark: its mode row picks the benchmark and that mode
    find("#benchmarks tr[data-bench='hrbench_4k'][data-mode='tool']")[0].click()
    wait_for(lambda: items() == eval_viewer["hr"], what="the hrbench items")
    assert not find(".mode-row.mode-no_tool") and "mode=tool" in browser.current_url
    failed = find(f"article[data-item='{eval_viewer['hr'][1]}'] .sample[data-mode='tool'][data-sample='1']")
    assert "scored by failed" in failed[0].text
    assert any("scored by judge" in s.text for s in find(".sample"))
    pick("input[name=e-mode][value=both]")

    sources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert sources and all(s.startswith(url) for s in sources), sources
    shot = tmp_path / "viewer-eval.png"
    browser.save_screenshot(str(shot))
    assert Image.open(shot).size[0] >= 1000 and shot.stat().st_size > 20_000
