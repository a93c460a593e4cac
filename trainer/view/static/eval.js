// The evaluation view (a `python -m trainer eval` folder): its benchmarks and modes with their
// headline figures on the left; per benchmark its items, each with its k samples side by side, a
// row per mode (with the tool / without it), filters on outcome, tool use, category and mode.
// Uses viewer.js's helpers ($, el, svg, fmt, badge, boxRect, boxKind, highlight); the state lives
// in the URL hash (#bench=vstar&outcome=wrong&tool=1&cat=single&mode=tool).
"use strict";

const evalState = { bench: null, outcome: "all", tool: false, cat: "", mode: "both" };
let evalSummary = null;   // api/run's "eval": {benchmarks: [{benchmark, modes: [...], plot}], protocol, ...}
let evalRecords = [];     // api/eval/BENCH: the items.jsonl records of evalState.bench
let evalLoaded = null;    // {bench, saved} of the records on the page
const MODE_NAMES = { tool: "with the tool", no_tool: "without the tool" };
const modeName = (m) => MODE_NAMES[m] || m;
const evalFileURL = (name) => "files/" + name.split("/").map(encodeURIComponent).join("/");

// a sample passes the filters; an item is shown when one of its samples of the shown modes does
const sampleUsedTool = (r) => (r.tool_calls || []).some((c) => c.executed);
const EVAL_OUTCOMES = { all: () => true, correct: (r) => !!r.correct, wrong: (r) => !r.correct };
const modeShown = (r) => evalState.mode === "both" || r.mode === evalState.mode;
const samplePasses = (r) => EVAL_OUTCOMES[evalState.outcome](r) && (!evalState.tool || sampleUsedTool(r));

function evalReadHash() {
  const p = new URLSearchParams(location.hash.slice(1));
  if (p.get("bench")) evalState.bench = p.get("bench");
  evalState.outcome = p.get("outcome") in EVAL_OUTCOMES ? p.get("outcome") : "all";
  evalState.tool = p.get("tool") === "1";
  evalState.cat = p.get("cat") || "";
  evalState.mode = ["both", "tool", "no_tool"].includes(p.get("mode")) ? p.get("mode") : "both";
  const form = $("#eval-controls");
  form.querySelector(`input[name=e-outcome][value=${evalState.outcome}]`).checked = true;
  form.querySelector(`input[name=e-mode][value=${evalState.mode}]`).checked = true;
  form.querySelector("input[name=e-tool]").checked = evalState.tool;
}

function evalWriteHash() {
  const p = new URLSearchParams({ bench: evalState.bench ?? "", outcome: evalState.outcome, mode: evalState.mode });
  if (evalState.tool) p.set("tool", "1");
  if (evalState.cat) p.set("cat", evalState.cat);
  history.replaceState(null, "", "#" + p);
}

let evalHashRead = false;

async function evalRefresh(summary) {
  if (!evalHashRead) { evalReadHash(); evalHashRead = true; }
  evalSummary = summary;
  const benches = summary.benchmarks;
  if (!benches.some((b) => b.benchmark === evalState.bench)) evalState.bench = benches[0]?.benchmark ?? null;
  renderBenchmarks();
  const current = benches.find((b) => b.benchmark === evalState.bench);
  const saved = current ? current.modes.reduce((n, m) => n + m.saved, 0) : 0;
  if (current && (evalLoaded?.bench !== current.benchmark || evalLoaded.saved !== saved)) await loadBench();
  else renderItems();
  const episodes = benches.reduce((n, b) => n + b.modes.reduce((k, m) => k + m.saved, 0), 0);
  $("#status").textContent = `evaluation${summary.finished ? "" : " (running: figures so far)"} · `
    + `${benches.length} benchmarks · ${episodes} episodes · read ${new Date().toLocaleTimeString()}`;
}

async function loadBench() {
  const bench = evalState.bench;
  const list = await getJSON(`api/eval/${encodeURIComponent(bench)}`);
  if (bench !== evalState.bench) return;  // another benchmark was picked meanwhile
  evalRecords = list;
  evalLoaded = { bench, saved: list.length };
  const cats = [...new Set(list.map((r) => r.category))].sort();
  if (evalState.cat && !cats.includes(evalState.cat)) evalState.cat = "";
  $("#eval-controls select[name=e-cat]").replaceChildren(el("option", { value: "" }, "all"),
    ...cats.map((c) => el("option", { value: c }, c)));
  $("#eval-controls select[name=e-cat]").value = evalState.cat;
  renderItems();
}

function selectBench(bench, mode) {
  evalState.bench = bench;
  if (mode) {
    evalState.mode = mode;
    $(`#eval-controls input[name=e-mode][value=${mode}]`).checked = true;
  }
  renderBenchmarks();
  if (evalLoaded?.bench === bench) renderItems();
  else loadBench().catch((err) => { $("#status").textContent = err.message; });
}

function evalHashChange() {
  const before = evalState.bench;
  evalReadHash();
  if (evalState.bench !== before) selectBench(evalState.bench); else renderItems();
}

// ---------------------------------------------------------------------------------------------

function figuresTitle(m) {
  const cats = Object.entries(m.categories || {}).map(([c, f]) => `  ${c}: Avg@k ${fmt(f["avg@k"], 3)}, `
    + `pass@k ${fmt(f["pass@k"], 3)} (${f.items} items)`);
  return [`${m.items} items, k = ${m.k}, ${m.episodes} episodes` + (m.final ? "" : " (so far: the harness is running)"),
    `answered ${fmt(m.answered, 3)} · judged ${fmt(m.judged, 3)} · error turns ${fmt(m.error_turn_rate, 3)}`,
    `failed episodes ${m.failed ?? 0} · judge failures ${m.judge_failures ?? 0}`, ...cats].join("\n");
}

function renderBenchmarks() {
  const rows = [];
  for (const b of evalSummary.benchmarks) {
    b.modes.forEach((m, j) => {
      const tr = el("tr", { "data-bench": b.benchmark, "data-mode": m.mode,
        class: `mode-${m.mode}` + (b.benchmark === evalState.bench ? " selected" : "") + (m.final ? "" : " running") });
      if (j === 0) {
        const name = el("th", { rowspan: b.modes.length, class: "bench", title: "all modes of " + b.benchmark }, b.benchmark);
        name.addEventListener("click", (ev) => { ev.stopPropagation(); selectBench(b.benchmark, "both"); });
        tr.append(name);
      }
      tr.append(el("td", { class: "mode", title: modeName(m.mode) }, m.mode.replace("_", " ")), el("td", {}, fmt(m["avg@k"], 3)),
        el("td", {}, fmt(m["pass@k"], 3)), el("td", {}, fmt(m.tool_use)), el("td", {}, fmt(m.calls_per_episode)),
        el("td", {}, String(m.saved)));
      tr.title = figuresTitle(m);
      tr.addEventListener("click", () => selectBench(b.benchmark, m.mode));
      rows.push(tr);
    });
  }
  $("#benchmarks tbody").replaceChildren(...rows);
  const p = evalSummary.protocol;
  $("#protocol").textContent = p ? `protocol: k = ${p.k}, seed ${p.seed}, ${p.greedy ? "greedy" : `temperature ${p.temperature}`}, `
    + `options ${p.shuffle ? "shuffled per sample" : "in file order"}, crops ${p.map_crops ? "from the original" : "from the frame"}; `
    + `${p.matcher}; judge: ${p.judge}` + (evalSummary.model ? ` · model ${evalSummary.model}` : "") : "";
}

function evalHead() {
  const b = evalSummary.benchmarks.find((x) => x.benchmark === evalState.bench);
  if (!b) return [];
  const figs = b.modes.map((m) => el("span", { class: `badge mode-${m.mode}`, title: figuresTitle(m) },
    `${modeName(m.mode)}: Avg@${m.k} ${fmt(m["avg@k"], 3)} · pass@${m.k} ${fmt(m["pass@k"], 3)} · `
    + `tool use ${fmt(m.tool_use)} · ${fmt(m.calls_per_episode)} calls/episode`));
  return [el("h2", {}, b.benchmark, ...figs),
    b.plot ? el("img", { class: "plot", src: b.plot + `?n=${evalLoaded?.saved ?? 0}`, alt: `Avg@k per category of ${b.benchmark}` }) : null];
}

function renderItems() {
  evalWriteHash();
  $("#eval-head").replaceChildren(...evalHead());
  const box = $("#items");
  const items = new Map();  // item id -> its records, in items.jsonl's order
  for (const r of evalRecords) items.set(r.item, [...(items.get(r.item) || []), r]);
  const visible = [...items].filter(([, recs]) => (!evalState.cat || recs[0].category === evalState.cat)
    && recs.some((r) => modeShown(r) && samplePasses(r)));
  $("#e-count").textContent = evalState.bench == null ? "no benchmark yet"
    : `${evalState.bench}: ${visible.length} of ${items.size} items shown`;
  if (!items.size) {
    box.replaceChildren(el("p", { class: "empty-note" }, evalState.bench == null
      ? "The evaluation has no episode yet: this page reads it again every few seconds."
      : "No episode of this benchmark in items.jsonl yet."));
    return;
  }
  box.replaceChildren(...visible.map(([id, recs]) => itemCard(id, recs)));
}

// the question without the sample's option listing (each sample shows the options in its own order)
function questionText(r) {
  const q = r.question ?? "";
  const cut = q.search(/\n\s*(\(A\)|Options:)/);
  return cut > 0 ? q.slice(0, cut) : q;
}

function frameOf(r) {
  const im = (r.images || [])[0];
  if (im) return im;
  return r.frame_size ? { file: null, width: r.frame_size[0], height: r.frame_size[1] } : null;
}

function frameView(r, calls, what) {
  const im = frameOf(r);
  if (!im) return el("div", { class: "frame", style: "aspect-ratio: 1" }, el("div", { class: "missing" }, "no frame recorded"));
  const { width: W, height: H } = im;
  const frame = el("div", { class: "frame", style: `aspect-ratio: ${W} / ${H}` });
  frame.append(im.file ? el("img", { class: "original", src: evalFileURL(im.file), alt: what })
    : el("div", { class: "missing" }, "image not kept (eval --images-kb spent or 0)"));
  const overlay = svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none" });
  if (r.target_box) overlay.append(boxRect(r.target_box, "target", "target box of the item"));
  calls.forEach((c, i) => {
    const b = callBox(c);
    if (b) overlay.append(boxRect(b, `box ${boxKind(c)}`, `call ${i + 1} [${b.join(", ")}]: ${c.text}`));
  });
  frame.append(overlay);
  return frame;
}

function callBox(c) {
  const b = c.box ?? c.arguments?.bbox_2d;
  return Array.isArray(b) && b.length === 4 && b.every((v) => Number.isFinite(Number(v))) ? b.map(Number) : null;
}

function itemCard(id, recs) {
  const first = recs[0];
  const byMode = new Map();
  for (const r of recs) byMode.set(r.mode, [...(byMode.get(r.mode) || []), r]);
  const head = el("h3", {}, el("span", { class: "uid" }, `item ${id}`), badge(first.category, "", "category"),
    ...[...byMode].map(([m, rs]) => {
      const right = rs.filter((r) => r.correct).length;
      return badge(`${modeName(m)}: ${right}/${rs.length} correct`, `mode-${m} ` + (right ? "good" : "bad"));
    }));
  const question = el("div", { class: "question" }, questionText(first) || "(question not recorded)",
    el("span", { class: "truth" }, ` — correct option: ${first.reference ?? "?"}`));
  const rows = [...byMode].filter(([m]) => evalState.mode === "both" || m === evalState.mode).map(([m, rs]) =>
    el("div", { class: `mode-row mode-${m}`, "data-mode": m }, el("div", { class: "mode-label" }, modeName(m)),
      el("div", { class: "samples" }, ...rs.sort((a, b) => a.sample - b.sample).map(sampleCard))));
  return el("article", { class: "item", "data-item": id, "data-category": first.category }, head, question,
    el("div", { class: "body" }, el("div", { class: "visual" }, frameView(first, [], "the item's image (model frame)"),
      el("div", { class: "legend" }, frameOf(first) ? `${frameOf(first).width}×${frameOf(first).height} model frame` : "")),
    el("div", { class: "modes" }, ...rows)));
}

function sampleCard(r) {
  const letters = "ABCDEFGHIJ";
  const calls = r.tool_calls || [];
  const head = el("div", { class: "sample-head" }, el("b", {}, `sample ${r.sample}`),
    badge(r.correct ? "correct" : "wrong", r.correct ? "good" : "bad"),
    badge(`scored by ${r.scored_by}`, "scorer", "rule: the answer named an option (letter or text); judge: it did not, "
      + "the judge decided; judge_failed: the judge gave no verdict; failed: the episode did not come back"),
    badge(`seed ${r.seed}`, "", "the recorded seed: option order and sampling follow it"));
  const options = el("ol", { class: "options", title: `shown order (file indices): ${(r.options_order || []).join(", ")}` },
    ...(r.options || []).map((o, j) => el("li", {
      class: [letters[j] === r.correct_letter ? "truth" : "", letters[j] === r.chosen ? "chosen" : ""].join(" ").trim(),
      "data-letter": letters[j] }, `(${letters[j]}) ${o}`)));
  const answer = r.answer == null ? "none" : JSON.stringify(r.answer);
  const read = el("div", { class: "read", title: answer }, `answer read: ${answer.length > 120 ? answer.slice(0, 120) + "…" : answer}`
    + ` → ${r.chosen ?? "no option"}; correct: ${r.correct_letter ?? r.reference ?? "?"}`
    + (r.finish ? ` · ${r.num_turns ?? "?"} turns, ended by ${r.finish}` : ""));
  const card = el("div", { class: `sample mode-${r.mode} ${r.correct ? "right" : "wrong"}` + (samplePasses(r) ? "" : " dim"),
    "data-uid": r.uid ?? "", "data-mode": r.mode, "data-sample": r.sample }, head, options, read);
  if (calls.length) {
    const crops = el("div", { class: "crops" });
    calls.forEach((c, i) => {
      const b = callBox(c);
      const caption = el("figcaption", {}, `call ${i + 1}` + (b ? ` [${b.map((v) => Math.round(v)).join(",")}]` : ""));
      if (c.image) crops.append(el("figure", {}, el("img", { src: evalFileURL(c.image), alt: `crop of call ${i + 1}` }), caption));
    });
    card.append(el("div", { class: "calls" }, frameView(r, calls, "the frame with the boxes asked for"), crops,
      ...calls.map((c, i) => {
        const b = callBox(c);
        return el("div", { class: `call-line ${boxKind(c)}` }, `call ${i + 1} (turn ${c.turn + 1}) ${c.name || "(unparsed)"}`
          + (b ? ` [${b.join(", ")}]` : "") + `: ${c.executed ? (c.ok ? "crop returned" : "rejected") : "not executed"}`
          + (c.text ? ` · ${c.text}` : ""));
      })));
  } else if (r.mode === "tool") {
    card.append(el("div", { class: "call-line" }, "no tool call"));
  }
  if (r.response != null) {
    card.append(el("details", { class: "response" }, el("summary", {}, "response"),
      el("div", { class: "turn assistant" }, ...highlight(r.response))));
  }
  return card;
}

$("#eval-controls").addEventListener("change", (ev) => {
  const input = ev.target;
  if (input.name === "e-outcome") evalState.outcome = input.value;
  if (input.name === "e-mode") evalState.mode = input.value;
  if (input.name === "e-tool") evalState.tool = input.checked;
  if (input.name === "e-cat") evalState.cat = input.value;
  renderItems();
});
