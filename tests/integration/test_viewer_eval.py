"""The viewer on an evaluation folder (`python -m trainer eval --out DIR`), written without Ray by the
harness's own writer (ItemsWriter, run_items' on_record), outcome_from, summarize and
render_eval_bars, in a real browser; and the writer's thumbnail budget."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from viewer_support import CHROMEDRIVER, CHROMIUM, browser, call, raw_get, serving, wait_for  # noqa: F401 (browser: a fixture)
from services.rollout.trajectory import ToolCallRecord, Trajectory
from services.tools.zoom import crop_image

pytestmark = pytest.mark.timeout(180)

if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)) and not os.environ.get("CI"):
    pytest.skip("needs Debian's chromium and chromium-driver (scripts/setup.sh installs them)",
                allow_module_level=True)


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
