// The run viewer: the step list, one step's saved episodes (or their GRPO groups), and filters.
// Plain DOM, no library, nothing fetched from elsewhere: the page works offline. The state lives in
// the URL hash (#step=3&outcome=correct&tool=1&view=groups), so a view can be linked to. The run
// is read again every REFRESH_MS: a run still being written shows its new steps as they land.
// An evaluation folder (api/run's kind "eval") is shown by eval.js with the helpers defined here.
"use strict";

const REFRESH_MS = 5000;
const SVG_NS = "http://www.w3.org/2000/svg";
const state = { step: null, outcome: "all", tool: false, view: "episodes" };
let steps = [];       // api/run: one record per step (metrics merged, episodes saved)
let episodes = [];    // api/steps/N: the saved episodes of state.step
let loaded = null;    // {step, saved} of the episodes on the page (reloaded when a step grows)

const $ = (sel, root = document) => root.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) if (c != null) node.append(c);
  return node;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) node.append(c);
  return node;
}

function fmt(x, digits = 2) {
  return x == null || Number.isNaN(Number(x)) ? "–" : Number(x).toFixed(digits);
}

const fileURL = (name) => "files/trajectories/" + name.split("/").map(encodeURIComponent).join("/");

// ---------------------------------------------------------------------------------------------
// filters: the reward parts as the judge set them (docs/design.md, "Reward")

const correct = (e) => (e.reward?.acc ?? 0) > 0;
const usedTool = (e) => (e.tool_calls || []).some((c) => c.executed);
const OUTCOMES = {
  all: () => true,
  correct,
  wrong: (e) => !correct(e),
  format: (e) => (e.reward?.format ?? 0) < 0,
};
const shown = (e) => OUTCOMES[state.outcome](e) && (!state.tool || usedTool(e));

// ---------------------------------------------------------------------------------------------
// state <-> URL hash and form

function readHash() {
  const p = new URLSearchParams(location.hash.slice(1));
  if (p.get("step")) state.step = Number(p.get("step"));
  if (p.get("outcome") in OUTCOMES) state.outcome = p.get("outcome");
  state.tool = p.get("tool") === "1";
  if (["episodes", "groups"].includes(p.get("view"))) state.view = p.get("view");
  const form = $("#controls");
  form.querySelector(`input[name=outcome][value=${state.outcome}]`).checked = true;
  form.querySelector(`input[name=view][value=${state.view}]`).checked = true;
  form.querySelector("input[name=tool]").checked = state.tool;
}

function writeHash() {
  const p = new URLSearchParams({ step: state.step ?? "", outcome: state.outcome, view: state.view });
  if (state.tool) p.set("tool", "1");
  history.replaceState(null, "", "#" + p);
}

// ---------------------------------------------------------------------------------------------
// reading the run

async function getJSON(url) {
  const r = await fetch(url, { cache: "no-store" });
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r.json();
}

async function refresh() {
  try {
    const run = await getJSON("api/run");
    $("#run-dir").textContent = run.run_dir;
    $("#links").replaceChildren(...Object.entries(run.links).map(
      ([name, url]) => el("a", { href: url, target: "_blank" }, name)));
    if (run.kind === "eval") {  // an evaluation harness's folder: eval.js shows it
      document.body.classList.add("eval");
      await evalRefresh(run.eval);
      return;
    }
    steps = run.steps;
    if (!steps.some((s) => s.step === state.step)) {  // the latest step with episodes
      const saved = steps.filter((s) => s.saved > 0);
      state.step = (saved.at(-1) || steps.at(-1) || { step: null }).step;
    }
    renderSteps();
    const current = steps.find((s) => s.step === state.step);
    if (current && (loaded?.step !== current.step || loaded.saved !== current.saved)) await loadEpisodes();
    else if (!current) renderEpisodes();
    $("#status").textContent = `${steps.length} steps · read ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    $("#status").textContent = `cannot read the run: ${err.message}`;
  }
}

async function loadEpisodes() {
  const step = state.step;
  const list = await getJSON(`api/steps/${step}`);
  if (step !== state.step) return;  // another step was picked meanwhile
  episodes = list;
  loaded = { step, saved: steps.find((s) => s.step === step)?.saved ?? list.length };
  renderEpisodes();
}

function selectStep(step) {
  state.step = step;
  renderSteps();
  loadEpisodes().catch((err) => { $("#status").textContent = err.message; });
}

// ---------------------------------------------------------------------------------------------
// rendering

function renderSteps() {
  const rows = steps.map((s) => {
    const tr = el("tr", { "data-step": s.step, class: (s.step === state.step ? "selected " : "") + (s.saved ? "" : "empty") },
      el("td", {}, String(s.step)), el("td", {}, fmt(s["reward/score"])), el("td", {}, fmt(s["reward/acc"])),
      el("td", {}, fmt(s["rollout/tool_calls"])), el("td", {}, String(s.saved ?? 0)));
    tr.title = Object.entries(s).filter(([k]) => k.includes("/"))
      .map(([k, v]) => `${k} = ${typeof v === "number" ? +v.toPrecision(4) : v}`).join("\n");
    tr.addEventListener("click", () => selectStep(s.step));
    return tr;
  });
  $("#steps tbody").replaceChildren(...rows);
}

function renderEpisodes() {
  writeHash();
  const box = $("#episodes");
  const visible = episodes.filter(shown);
  $("#count").textContent = state.step == null ? "no steps yet"
    : `step ${state.step}: ${visible.length} of ${episodes.length} saved episodes shown`;
  if (!episodes.length) {
    box.replaceChildren(el("p", { class: "empty-note" }, state.step == null
      ? "The run has no step yet: this page reads it again every few seconds."
      : "No episodes were saved with this step (logging.save_trajectories)."));
    return;
  }
  if (state.view === "episodes") {
    box.replaceChildren(...visible.map(episodeCard));
    return;
  }
  const groups = new Map();  // GRPO groups: the samples of one prompt, best advantage first
  for (const e of visible) groups.set(e.group_id, [...(groups.get(e.group_id) || []), e]);
  box.replaceChildren(...[...groups].map(([gid, members]) => {
    members.sort((a, b) => (b.advantage ?? 0) - (a.advantage ?? 0));
    const saved = episodes.filter((e) => e.group_id === gid).length;
    const scores = members.map((e) => e.reward?.score ?? 0);
    return el("section", { class: "group", "data-group": gid },
      el("h2", {}, `prompt ${gid}: ${members.length} shown, ${saved} saved of the ${members[0].group_size ?? "?"} `
        + `samples of its group · scores ${scores.map((s) => fmt(s, 1)).join(" ")} · ${members[0].question}`),
      el("div", { class: "members" }, ...members.map(episodeCard)));
  }));
}

function badge(text, cls = "", title = "") {
  return el("span", { class: `badge ${cls}`, title }, text);
}

function episodeCard(e) {
  const r = e.reward || {};
  const adv = e.advantage;
  const head = el("h3", {}, el("span", { class: "uid" }, e.uid),
    badge(`score ${fmt(r.score)}`, r.score > 0 ? "good" : "bad", "reward/score = 0.8 acc + 0.2 format + 1.2 tool"),
    badge(`acc ${fmt(r.acc, 0)}`, "", "reward/acc"), badge(`format ${fmt(r.format, 0)}`, "", "reward/format"),
    badge(`tool ${fmt(r.tool, 0)}`, "", "reward/tool"),
    badge(`advantage ${fmt(adv)}`, "advantage " + (adv > 0 ? "adv-pos" : adv < 0 ? "adv-neg" : ""),
      "GRPO advantage: (score - group mean) / (group std + 1e-6)"),
    badge(`policy v${e.version}`, "", "policy version that sampled it"),
    badge(`${e.num_turns} turns`, "", "1 (prompt) + assistant turns + observation turns"),
    badge(`${e.response_tokens ?? "?"} response tokens, ${e.policy_tokens ?? "?"} sampled`, "",
      `prompt: ${e.prompt_tokens ?? "?"} tokens`),
    badge(e.finish_reason, "", "why the episode ended"));
  const question = el("div", { class: "question" }, e.question ?? "",
    el("span", { class: "truth" }, ` — reference: ${e.ground_truth ?? "?"}; answer read: ${r.answer ?? "none"}`
      + (r.judge_ok === false ? `; judge failed: ${r.failure}` : "")));
  return el("article", { class: "episode", "data-uid": e.uid },
    head, question, el("div", { class: "body" }, visual(e), transcript(e)));
}

function boxRect(box, cls, label) {
  const [x1, y1, x2, y2] = box;
  const g = svg("g", {}, svg("title", {}, label));
  g.append(svg("rect", { class: cls, x: Math.min(x1, x2), y: Math.min(y1, y2),
    width: Math.abs(x2 - x1), height: Math.abs(y2 - y1) }));
  return g;
}

function boxKind(c) {
  return !c.executed ? "unused" : c.ok ? "valid" : "rejected";
}

function visual(e) {
  const original = (e.images || [])[0];
  const wrap = el("div", { class: "visual" });
  if (!original) {
    wrap.append(el("div", { class: "frame", style: "aspect-ratio: 1" },
      el("div", { class: "missing" }, "no image saved with this episode")));
    return wrap;
  }
  const { width: W, height: H } = original;
  const frame = el("div", { class: "frame", style: `aspect-ratio: ${W} / ${H}` });
  frame.append(original.file ? el("img", { class: "original", src: fileURL(original.file), alt: "the image (model frame)" })
    : el("div", { class: "missing" }, "image not saved: the step's logging.trajectory_images_kb was spent"));
  const overlay = svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none" });
  if (e.target_box) overlay.append(boxRect(e.target_box, "target", "target box of the data row"));
  (e.tool_calls || []).forEach((c, i) => {
    if (c.box) overlay.append(boxRect(c.box, `box ${boxKind(c)}`, `call ${i + 1} [${c.box.join(", ")}]: ${c.text}`));
  });
  frame.append(overlay);
  const crops = el("div", { class: "crops" });
  (e.tool_calls || []).forEach((c, i) => {
    if (!(c.ok && c.appended)) return;
    const caption = el("figcaption", {}, `call ${i + 1}` + (c.box ? ` [${c.box.map((v) => Math.round(v)).join(",")}]` : ""));
    crops.append(c.image ? el("figure", {}, el("img", { src: fileURL(c.image), alt: `crop of call ${i + 1}` }), caption)
      : el("figure", {}, el("div", {}, "crop not saved"), caption));
  });
  wrap.append(frame, el("div", { class: "legend" }, `${W}×${H} model frame`), crops);
  return wrap;
}

// tool calls, answers and thinking stand out; everything is a text node (no HTML from the model)
const MARKUP = /(<tool_call>[\s\S]*?(?:<\/tool_call>|$)|<code>[\s\S]*?(?:<\/code>|$)|<answer>[\s\S]*?(?:<\/answer>|$)|<think>[\s\S]*?(?:<\/think>|$))/;
const MARKUP_CLASS = { "<tool_call>": "call", "<code>": "call", "<answer>": "answer", "<think>": "think" };

function highlight(text) {
  return text.split(MARKUP).filter(Boolean).map((part) => {
    const tag = Object.keys(MARKUP_CLASS).find((t) => part.startsWith(t));
    return tag ? el("span", { class: MARKUP_CLASS[tag] }, part) : document.createTextNode(part);
  });
}

function transcript(e) {
  const box = el("div", { class: "transcript" });
  const turns = e.turns || [{ role: "assistant", text: e.response ?? "", tokens: e.response_tokens ?? "?" }];
  // the observation of assistant turn k, when there is one, is the k-th tool turn
  const said = turns.filter((t) => t.role === "assistant");
  const observed = turns.filter((t) => t.role === "tool");
  said.forEach((t, k) => {
    box.append(el("div", { class: "turn assistant" },
      el("span", { class: "who" }, `assistant · turn ${k + 1} · ${t.tokens} tokens`), ...highlight(t.text)));
    const calls = (e.tool_calls || []).map((c, i) => [c, i]).filter(([c]) => c.turn === k);
    if (!calls.length && !observed[k]) return;
    box.append(el("div", { class: "turn tool" },
      el("span", { class: "who" }, observed[k] ? `tool · ${observed[k].tokens} observation tokens (loss mask 0)`
        : "tool · not shown to the model"),
      ...calls.map(([c, i]) => callView(c, i))));
  });
  return box;
}

// one call: its head line; a code call also shows its code, its output and the images it returned
function callView(c, i) {
  const head = `call ${i + 1} ${c.name || "(unparsed)"}${c.status ? ` · ${c.status}` : ""}`
    + `${c.latency_s ? ` · ${c.latency_s.toFixed(2)} s` : ""}${c.appended ? "" : " (not appended)"}`;
  const code = c.arguments && typeof c.arguments.code === "string" ? c.arguments.code : null;
  const query = c.arguments && typeof c.arguments.query === "string" ? c.arguments.query : null;
  const parts = [el("div", {}, head + (code || query ? "" : `: ${c.text}`))];
  if (code) parts.push(el("pre", { class: "code" }, code));
  if (query) parts.push(el("div", {}, `query: ${query}`));
  if (code || query) parts.push(el("pre", { class: "output" }, c.text));
  const shots = (c.image_files || []).filter(Boolean);
  if (code && shots.length) {
    parts.push(el("div", { class: "crops" }, ...shots.map((f, j) =>
      el("figure", {}, el("img", { src: fileURL(f), alt: `image ${j + 1} of call ${i + 1}` })))));
  }
  return el("div", { class: c.ok ? "ok" : "err" }, ...parts);
}

// ---------------------------------------------------------------------------------------------

$("#controls").addEventListener("change", (ev) => {
  const input = ev.target;
  if (input.name === "outcome") state.outcome = input.value;
  if (input.name === "view") state.view = input.value;
  if (input.name === "tool") state.tool = input.checked;
  renderEpisodes();
});
window.addEventListener("hashchange", () => {
  if (document.body.classList.contains("eval")) return evalHashChange();
  const before = state.step;
  readHash();
  if (state.step !== before) selectStep(state.step); else renderEpisodes();
});
readHash();
refresh();
setInterval(refresh, REFRESH_MS);
