// The codeworld dashboard page: curves from /api/series (downsampled on the server), live rows from
// /api/events (server-sent events), the sample browser from /api/samples. No build step: plain
// browser JavaScript and the vendored uPlot. Text from runs (completions, names) is only ever set
// with textContent, never parsed as HTML: a completion is an adversary's output.
"use strict";

const POINTS = 1000; // points per curve asked of the server
const REFETCH_AT = 2 * POINTS; // live appends beyond this refetch a downsampled curve
const PAGE = 50;
const COLORS = [
  "#2f6fdf",
  "#e5484d",
  "#1aa053",
  "#d99a21",
  "#8e4ec6",
  "#0d9488",
  "#e5588f",
  "#6b7280",
  "#a16207",
  "#0ea5e9",
];

// One chart per spec (or per key a spec derives from the name); a metric goes to the first spec
// whose pattern matches, so every metric a run logs is drawn somewhere (the "Other" tab at worst).
const HEALTH =
  "graded_per_s|no_reward|verifier_deadline|timeouts|ooms|sandbox_errors|runtime_errors|" +
  "output_limits|verify_p50_s|verify_p99_s|sandbox_p50_s|sandbox_p99_s";
const SPECS = [
  {tab: "training", key: "reward", title: "Train reward (mean)", re: /^(?:env\/(.+)|train)\/reward_mean$/},
  // The curve that says whether the run works, beside the train reward (the rest of eval/ has a tab).
  // Evaluation curves are never smoothed: a few points on fixed sets, whose last value matters.
  {
    tab: "training",
    key: "heldout",
    title: "Held-out evaluation",
    re: /^eval\/([^/]+)\/(greedy|pass_at_\d+)$/,
    label: m => `${m[1]} ${m[2]}`,
    smooth: false,
  },
  {
    tab: "training",
    key: "pass",
    title: "Train pass rate (full reward)",
    re: /^(?:env\/(.+)|train)\/pass_rate$/,
  },
  {
    tab: "training",
    key: "length",
    title: "Response length (tokens)",
    re: /^(?:env\/(.+)|train)\/response_len$/,
  },
  {
    tab: "training",
    key: "truncation",
    title: "Truncation rate",
    re: /^(?:env\/(.+)|train)\/truncation_rate$/,
  },
  {tab: "training", key: "batch", title: "Samples per step", re: /^(?:env\/(.+)|train)\/samples$/},
  {tab: "training", key: "entropy", title: "Policy entropy", re: /^train\/(entropy)$/},
  {tab: "training", key: "clip", title: "Clip fraction", re: /^train\/(clip_frac)$/},
  {
    tab: "training",
    key: "mismatch",
    title: "Sampler/learner mismatch",
    re: /^train\/(mismatch_kl|mismatch_abs)$/,
  },
  {tab: "training", key: "grad", title: "Grad norm (before clipping)", re: /^train\/(grad_norm)$/},
  {tab: "training", key: "loss", title: "Loss", re: /^train\/(loss)$/},
  {
    tab: "training",
    key: "staleness",
    title: "Staleness: samples per age (versions behind)",
    re: /^train\/staleness\/(\d+)$/,
    stacked: true,
  },
  // Off-policy health: how far the sampler's policy had drifted from the learner's, by staleness.
  {tab: "training", key: "is-q", title: "Importance weights exp(prox − sampler): quantiles",
   re: /^train\/is\/(p\d+)$/},
  {tab: "training", key: "is-kl", title: "Sampler→learner KL per token, by staleness",
   re: /^train\/is\/(all|age\d+)\/kl$/},
  {tab: "training", key: "is-cap", title: "Tokens beyond the importance cap (truncated or masked)",
   re: /^train\/is\/(all|age\d+)\/(above_cap|below_inverse_cap)$/, label: m => `${m[1]} ${m[2]}`},
  {tab: "training", key: "by-age", title: "Train reward by staleness", re: /^train\/by_age\/(\d+)\/reward_mean$/},
  {tab: "training", key: "dropped", title: "Dropped per step, by reason", re: /^train\/dropped\/(.+)$/},
  {
    tab: "evaluation",
    key: m => "eval-" + m[2],
    title: m => "Held-out: " + m[2],
    re: /^eval\/([^/]+)\/(.+)$/,
    smooth: false,
  },
  {tab: "throughput", key: "tokens", title: "Generated tokens/s", re: /^perf\/(tokens_per_s)$/},
  {tab: "throughput", key: "spm", title: "Learner steps per minute", re: /^perf\/(steps_per_min)$/},
  {
    tab: "throughput",
    key: "split",
    title: "Where a step's time went (s)",
    re: /^perf\/(train_s|sync_s|wait_s)$/,
    stacked: true,
  },
  {
    tab: "throughput",
    key: "idle",
    title: "Learner idle share (waiting for data)",
    re: /^perf\/(learner_idle)$/,
  },
  {tab: "throughput", key: m => "perf-" + m[1], title: m => m[1], re: /^perf\/(.+)$/},
  {
    tab: "health",
    key: m => "env-" + m[2],
    title: m => "Per environment: " + m[2],
    re: new RegExp("^env\\/([^/]+)\\/(" + HEALTH + ")$"),
  },
  {
    tab: "health",
    key: m => "sandbox-" + m[3],
    title: m => "Sandbox pools: " + m[3],
    re: /^sandbox\/([^/]+)\/(.+)\/([^/]+)$/,
    label: m => m[1] + " · " + m[2],
  },
  {
    tab: "health",
    key: m => "sandbox-" + m[1],
    title: m => "Sandboxes: " + m[1],
    re: /^sandbox\/(.+)$/,
    label: () => "value",
  },
  {tab: "other", key: m => "other-" + m[0], title: m => m[0], re: /^(.+)$/, label: () => "value"},
];

const state = {
  runs: [],
  selected: [],
  names: {},
  data: {},
  charts: new Map(),
  tab: "training",
  smoothing: 0.6,
  live: {events: 0, last: 0, source: null},
  sample: {offset: 0, total: 0, selected: null},
  redraw: null,
};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    for (const x of Array.isArray(v) ? v : [v]) if (x !== undefined && x !== null && x !== "") q.append(k, x);
  }
  return q.toString();
}

async function api(path, params = {}) {
  const res = await fetch(`api/${path}?${query(params)}`, {credentials: "same-origin"});
  if (!res.ok) throw new Error(`${path}: ${res.status} ${(await res.json().catch(() => ({}))).detail || ""}`);
  return res.json();
}

// ------------------------------------------------------------------ charts: which, and their data
function chartsOf(run) {
  const out = new Map();
  for (const name of state.names[run] || []) {
    for (const spec of SPECS) {
      const m = name.match(spec.re);
      if (!m) continue;
      const key = typeof spec.key === "function" ? spec.key(m) : spec.key;
      const title = typeof spec.title === "function" ? spec.title(m) : spec.title;
      const label = spec.label ? spec.label(m) : m[1] === undefined ? "all" : m[1];
      if (!out.has(key))
        out.set(key, {
          key,
          title,
          tab: spec.tab,
          stacked: !!spec.stacked,
          smooth: spec.smooth !== false,
          order: SPECS.indexOf(spec),
          members: [],
        });
      out.get(key).members.push({name, label});
      break;
    }
  }
  return out;
}

function layout() {
  // Charts of every selected run merged by key: one chart compares the runs.
  const merged = new Map();
  for (const run of state.selected) {
    for (const [key, c] of chartsOf(run)) {
      if (!merged.has(key)) merged.set(key, {...c, members: []});
      merged.get(key).members.push(...pruneAll(c.members).map(m => ({...m, run})));
    }
  }
  // In the order of SPECS (reward first), then by key.
  return new Map([...merged].sort(([a, x], [b, y]) => x.order - y.order || (a < b ? -1 : a > b ? 1 : 0)));
}

function pruneAll(members) {
  // "all" equals the one environment's curve when a run has one environment: draw it once.
  const envs = members.filter(m => m.label !== "all");
  return envs.length === 1 ? envs : members;
}

async function loadSeries(keys) {
  const wanted = {};
  for (const key of keys) {
    for (const m of state.layout.get(key).members) (wanted[m.run] ||= new Set()).add(m.name);
  }
  await Promise.all(
    Object.entries(wanted).map(async ([run, names]) => {
      const list = [...names];
      for (let i = 0; i < list.length; i += 200) {
        const got = await api("series", {run, name: list.slice(i, i + 200), points: POINTS});
        for (const s of got.series)
          state.data[`${run}|${s.name}`] = {x: s.steps, y: s.values, total: s.total};
      }
    }),
  );
}

function ema(ys, w) {
  // TensorBoard's debiased exponential moving average.
  if (!w) return ys;
  let acc = 0,
    n = 0;
  return ys.map(y => {
    if (y === null) return null;
    acc = acc * w + (1 - w) * y;
    n += 1;
    return acc / (1 - Math.pow(w, n));
  });
}

function aligned(chart) {
  const series = chart.members.map(m => ({m, d: state.data[`${m.run}|${m.name}`]})).filter(s => s.d);
  const xs = [...new Set(series.flatMap(s => s.d.x))].sort((a, b) => a - b);
  const index = new Map(xs.map((x, i) => [x, i]));
  const columns = series.map(s => {
    const col = new Array(xs.length).fill(null);
    s.d.x.forEach((x, i) => {
      col[index.get(x)] = s.d.y[i];
    });
    return col;
  });
  return {series, xs, columns};
}

function seriesLabel(m) {
  return state.selected.length > 1 ? `${m.run}: ${m.label}` : m.label;
}

function plotData(chart) {
  const {series, xs, columns} = aligned(chart);
  const opts = [{label: "step"}],
    data = [xs],
    bands = [];
  if (chart.stacked) {
    const acc = new Array(xs.length).fill(0);
    columns.forEach((col, i) => {
      const color = COLORS[i % COLORS.length];
      const raw = col;
      const cum = col.map((v, j) => (acc[j] += v || 0));
      data.push(cum);
      opts.push({
        label: seriesLabel(series[i].m),
        stroke: color,
        fill: color + "55",
        value: (u, v, si, idx) =>
          idx === null || raw[idx] === null ? "–" : (+raw[idx].toPrecision(4)).toString(),
      });
      if (i > 0) bands.push({series: [i + 1, i], fill: color + "55"});
    });
    opts.forEach((o, i) => {
      if (i > 1) delete o.fill;
    });
    return {opts, data, bands, raw: []};
  }
  const rawIdx = [];
  const smoothing = chart.smooth ? state.smoothing : 0;
  columns.forEach((col, i) => {
    const color = COLORS[i % COLORS.length];
    if (smoothing > 0) {
      data.push(col);
      opts.push({
        label: seriesLabel(series[i].m) + " (raw)",
        stroke: color + "40",
        spanGaps: true,
        points: {show: false},
      });
      rawIdx.push(data.length - 1);
    }
    data.push(ema(col, smoothing));
    opts.push({
      label: seriesLabel(series[i].m),
      stroke: color,
      width: 1.6,
      spanGaps: true,
      points: {show: xs.length < 40},
    });
  });
  return {opts, data, bands, raw: rawIdx};
}

function downloadHref(chart, format) {
  const runs = [...new Set(chart.members.map(m => m.run))];
  const names = [...new Set(chart.members.map(m => m.name))];
  return `api/series?${query({run: runs, name: names, points: 0, format})}`;
}

function buildChart(chart) {
  const box = el("div", {class: "chart", id: `chart-${chart.key}`});
  const links = el(
    "span",
    {class: "downloads"},
    el("a", {href: downloadHref(chart, "csv"), download: `${chart.key}.csv`, text: "CSV"}),
    el("a", {href: downloadHref(chart, "json"), download: `${chart.key}.json`, text: "JSON"}),
  );
  box.append(el("h3", {}, el("span", {text: chart.title}), links), el("div", {class: "plot"}));
  return box;
}

function render(chart) {
  const box = document.getElementById(`chart-${chart.key}`);
  if (!box) return;
  const plot = box.querySelector(".plot");
  const {opts, data, bands, raw} = plotData(chart);
  chart.points = Object.fromEntries(
    opts.slice(1).map((o, i) => [o.label, data[i + 1].filter(v => v !== null).length]),
  );
  if (chart.u) chart.u.destroy();
  if (data[0].length === 0) {
    plot.replaceChildren(el("p", {class: "empty", text: "no data yet"}));
    chart.u = null;
    return;
  }
  plot.replaceChildren();
  chart.u = new uPlot(
    {
      width: Math.max(plot.clientWidth, 300),
      height: 220,
      series: opts,
      bands,
      scales: {x: {time: false}, y: {range: yRange}},
      legend: {live: true},
      axes: [{label: "step"}, {size: 60, values: fmtTicks}],
      cursor: {drag: {x: true, y: false}},
    },
    data,
    plot,
  );
  const rows = chart.u.root.querySelectorAll(".u-legend .u-series");
  raw.forEach(i => {
    if (rows[i]) rows[i].style.display = "none";
  });
}

async function showTab(tab) {
  state.tab = tab;
  document.querySelectorAll("nav button").forEach(b => b.classList.toggle("active", b.dataset.tab === tab));
  document.querySelectorAll(".tab").forEach(s => s.classList.toggle("active", s.id === `tab-${tab}`));
  if (tab === "samples") return loadSamples();
  const section = document.getElementById(`tab-${tab}`);
  const keys = [...state.layout.values()].filter(c => c.tab === tab).map(c => c.key);
  section.replaceChildren(...keys.map(k => buildChart(state.layout.get(k))));
  if (!keys.length) section.replaceChildren(el("p", {class: "empty", text: "Nothing logged here yet."}));
  for (const [key, c] of state.charts)
    if (c.tab === tab && c.u) {
      c.u.destroy();
      c.u = null;
    }
  await loadSeries(keys);
  for (const k of keys) {
    const c = state.layout.get(k);
    state.charts.set(k, c);
    render(c);
  }
}

async function refreshLayout() {
  await Promise.all(
    state.selected.map(async run => {
      state.names[run] = (await api("metrics", {run})).names;
    }),
  );
  state.layout = layout();
  state.charts = new Map();
  await showTab(state.tab);
}

// ------------------------------------------------------------------ live updates
function connectLive() {
  // Resolves once the stream is open (its starting point is then fixed on the server, so curves
  // fetched afterwards miss no row), or after 5 s without it: the page still shows what exists.
  if (state.live.source) state.live.source.close();
  if (!state.selected.length) return Promise.resolve();
  const source = new EventSource(`api/events?${query({run: state.selected})}`);
  const opened = new Promise(resolve => {
    source.addEventListener("open", resolve, {once: true});
    setTimeout(resolve, 5000);
  });
  state.live.source = source;
  source.addEventListener("metrics", e => onRows(JSON.parse(e.data)));
  source.addEventListener("samples", () => {
    if (state.tab === "samples" && state.sample.offset === 0) loadSampleList();
  });
  source.onopen = () => updateLive();
  source.onerror = () => updateLive(true);
  return opened;
}

function onRows({run, rows, rewound}) {
  state.live.events += 1;
  state.live.last = Date.now();
  if (rewound) {
    // A new or resumed run rewrote the file: the curves are fetched again, not appended to.
    refreshLayout().then(() => updateLive());
    return;
  }
  let newNames = false,
    refetch = false;
  for (const row of rows) {
    for (const [name, value] of Object.entries(row)) {
      if (name === "step") continue;
      if (!(state.names[run] || []).includes(name)) {
        (state.names[run] ||= []).push(name);
        newNames = true;
        continue;
      }
      const d = state.data[`${run}|${name}`];
      if (!d) continue;
      if (d.x.length && row.step <= d.x[d.x.length - 1]) continue; // already fetched
      d.x.push(row.step);
      d.y.push(value);
      d.total += 1;
      if (d.x.length > REFETCH_AT) refetch = true;
    }
    const info = state.runs.find(r => r.id === run);
    if (info) info.steps = Math.max(info.steps, row.step);
  }
  if (newNames || refetch) {
    state.layout = layout();
    scheduleRedraw(true);
  } else scheduleRedraw(false);
  updateLive();
}

function scheduleRedraw(full) {
  // At most one redraw a second, however fast rows arrive.
  state.redrawFull = state.redrawFull || full;
  if (state.redraw) return;
  state.redraw = setTimeout(async () => {
    const full = state.redrawFull;
    state.redraw = null;
    state.redrawFull = false;
    if (state.tab === "samples") return;
    if (full) await showTab(state.tab);
    else for (const c of state.charts.values()) if (c.tab === state.tab) render(c);
  }, 1000);
}

function updateLive(error) {
  const node = document.getElementById("live");
  const anyLive = state.runs.some(r => state.selected.includes(r.id) && r.live);
  const ago = state.live.last ? Math.round((Date.now() - state.live.last) / 1000) : null;
  node.classList.toggle("on", !error && anyLive);
  node.textContent = error
    ? "live stream reconnecting…"
    : ago === null
      ? anyLive
        ? "live: waiting for the next step"
        : "finished runs"
      : `live: last update ${ago} s ago`;
}

// ------------------------------------------------------------------ runs
function drawRuns() {
  const box = document.getElementById("runs");
  box.replaceChildren(
    ...state.runs.map(r => {
      const input = el("input", {type: "checkbox", value: r.id});
      input.checked = state.selected.includes(r.id);
      input.addEventListener("change", () =>
        selectRuns([...box.querySelectorAll("input:checked")].map(i => i.value)),
      );
      return el(
        "label",
        {title: r.summary ? "finished" : r.live ? "training" : "stopped"},
        input,
        el("span", {class: "dot" + (r.live ? " live" : "")}),
        el("span", {text: `${r.id} (${r.steps})`}),
      );
    }),
  );
}

async function selectRuns(ids) {
  state.selected = ids;
  const params = new URLSearchParams(location.search);
  params.delete("run");
  params.delete("token");
  ids.forEach(id => params.append("run", id));
  history.replaceState(null, "", `?${params}`);
  await connectLive();
  await refreshLayout();
  fillSampleRuns();
}

// ------------------------------------------------------------------ samples
function fillSampleRuns() {
  const select = document.querySelector("#sample-filters select[name=run]");
  const withSamples = state.runs.filter(r => r.has_samples);
  const keep = select.value;
  select.replaceChildren(...withSamples.map(r => el("option", {value: r.id, text: r.id})));
  // The run picked here if it is still shown above, else the first run shown above that has samples.
  const preferred =
    withSamples.find(r => r.id === keep && state.selected.includes(r.id)) ||
    withSamples.find(r => state.selected.includes(r.id)) ||
    withSamples.find(r => r.id === keep);
  if (preferred) select.value = preferred.id;
}

function filters() {
  const form = new FormData(document.getElementById("sample-filters"));
  return Object.fromEntries([...form.entries()].filter(([, v]) => v !== ""));
}

async function loadSamples() {
  const f = filters();
  if (!f.run) {
    document.querySelector("#sample-table tbody").replaceChildren();
    return;
  }
  const facets = await api("samples/facets", {run: f.run});
  fillSelect("env", facets.envs);
  fillSelect("eval_set", facets.eval_sets);
  await loadSampleList();
}

function fillSelect(name, values) {
  const select = document.querySelector(`#sample-filters select[name=${name}]`);
  const keep = select.value;
  select.replaceChildren(
    el("option", {value: "", text: "all"}),
    ...values.map(v => el("option", {value: v, text: v})),
  );
  if (values.includes(keep)) select.value = keep;
}

async function loadSampleList() {
  const f = filters();
  if (!f.run) return;
  const page = await api("samples", {...f, offset: state.sample.offset, limit: PAGE});
  state.sample.total = page.total;
  const body = document.querySelector("#sample-table tbody");
  body.replaceChildren(
    ...page.items.map(s => {
      const row = el(
        "tr",
        {"data-id": s.id},
        el("td", {text: s.step}),
        el("td", {text: s.kind === "eval" ? `eval ${s.eval_set || ""}` : "train"}),
        el("td", {text: s.env}),
        el("td", {text: s.task_id}),
        el("td", {text: fmt(s.reward), class: s.reward > 0 ? "reward-pos" : ""}),
        el("td", {text: s.staleness ?? "–"}),
        el("td", {class: "preview", text: s.preview}),
      );
      row.addEventListener("click", () => showSample(f.run, s.id, row));
      return row;
    }),
  );
  const last = Math.min(state.sample.offset + PAGE, page.total);
  document.getElementById("page-info").textContent = page.total
    ? `${state.sample.offset + 1}–${last} of ${page.total}`
    : "no samples match";
}

function fmtTicks(u, ticks) {
  // As many decimals as the spacing of the ticks needs (entropy moves in the 4th digit).
  const gap = ticks.length > 1 ? Math.abs(ticks[1] - ticks[0]) : Math.abs(ticks[0] || 1);
  const big = Math.max(...ticks.map(Math.abs));
  if (big >= 1e6 || (gap > 0 && gap < 1e-4)) return ticks.map(x => (x === 0 ? "0" : x.toExponential(1)));
  const digits = gap > 0 ? Math.min(6, Math.max(0, 1 - Math.floor(Math.log10(gap)))) : 2;
  return ticks.map(x => (+x.toFixed(digits)).toString());
}

function yRange(u, min, max) {
  // A flat curve still gets an axis that reads sensibly (uPlot's default for all-zero is 0..100).
  if (min === null || max === null) return [0, 1];
  const size = Math.max(Math.abs(min), Math.abs(max));
  // Flat, up to the rounding of smoothing: pad by a tenth of the value.
  if (max - min <= 1e-9 * size) return size === 0 ? [0, 1] : [min - size * 0.1, max + size * 0.1];
  return uPlot.rangeNum(min, max, 0.1, false);
}

function fmt(x) {
  return typeof x === "number" ? (+x.toPrecision(4)).toString() : String(x);
}

function sampleBlocks(s) {
  // The prompt, then each turn: the model's turns numbered, the environment's set apart.
  const blocks = [
    el(
      "div",
      {class: "block prompt"},
      el("div", {class: "who", text: "prompt"}),
      el("pre", {text: s.prompt}),
    ),
  ];
  let modelTurn = 0;
  for (const t of s.turns) {
    const who =
      t.role === "model"
        ? `model · turn ${++modelTurn} · ${t.tokens} tokens`
        : `environment · ${t.tokens} tokens`;
    const text = el("pre", {class: t.role === "model" ? "completion" : "env-text", text: t.text});
    blocks.push(el("div", {class: `block ${t.role}`}, el("div", {class: "who", text: who}), text));
  }
  return blocks;
}

async function showSample(run, id, row) {
  document.querySelectorAll("#sample-table tr.selected").forEach(r => r.classList.remove("selected"));
  if (row) row.classList.add("selected");
  const s = await api("sample", {run, id});
  state.sample.selected = s;
  const meta = el("dl", {class: "meta"});
  const facts = [
    ["sample", s.id],
    ["environment", s.env],
    ["task", s.task_id],
    ["step", `${s.step} (${s.kind}${s.eval_set ? " · " + s.eval_set : ""})`],
    ["reward", fmt(s.reward)],
    [
      "policy versions",
      s.policy_min === s.policy_max ? `${s.policy_min}` : `${s.policy_min}–${s.policy_max}`,
    ],
    ["staleness", s.staleness ?? "–"],
    ["model tokens", `${s.completion_tokens}${s.truncated ? " (truncated)" : ""}`],
    [
      "timings",
      Object.entries(s.timings)
        .map(([k, v]) => `${k} ${fmt(v)} s`)
        .join(", "),
    ],
  ];
  for (const [k, v] of facts) meta.append(el("dt", {text: k}), el("dd", {text: v}));
  const compare = el("button", {type: "button", text: "Same task across steps"});
  compare.addEventListener("click", () => showTask(run, s.task_id));
  document
    .getElementById("sample-detail")
    .replaceChildren(
      meta,
      compare,
      ...sampleBlocks(s),
      el("div", {class: "who", text: "reward details"}),
      el("pre", {class: "info", text: JSON.stringify(s.reward_info, null, 2)}),
    );
}

async function showTask(run, taskId) {
  const got = await api("task", {run, task_id: taskId, limit: 64});
  const bySteps = new Map();
  for (const s of got.items) {
    const key = `${s.step}${s.kind === "eval" ? " eval" : ""}`;
    if (!bySteps.has(key)) bySteps.set(key, []);
    bySteps.get(key).push(s);
  }
  const columns = [...bySteps.entries()].map(([key, items]) =>
    el(
      "div",
      {class: "column"},
      el("h4", {
        text: `step ${key} · mean reward ${fmt(items.reduce((a, s) => a + s.reward, 0) / items.length)}`,
      }),
      ...items.map(s =>
        el(
          "div",
          {class: "block model"},
          el("div", {class: "who", text: `reward ${fmt(s.reward)}`}),
          el("pre", {text: s.turns.map(t => (t.role === "env" ? "[environment] " : "") + t.text).join("\n")}),
        ),
      ),
    ),
  );
  const box = document.getElementById("task-compare");
  box.replaceChildren(
    el("h3", {text: `Task ${taskId} across steps`}),
    el("div", {class: "columns"}, ...columns),
  );
  box.classList.add("active");
  box.scrollIntoView({behavior: "smooth"});
}

// ------------------------------------------------------------------ start
function wire() {
  document
    .querySelectorAll("nav button")
    .forEach(b => b.addEventListener("click", () => showTab(b.dataset.tab)));
  const slider = document.getElementById("smoothing");
  slider.addEventListener("input", () => {
    state.smoothing = +slider.value;
    document.getElementById("smoothing-value").textContent = state.smoothing.toFixed(2);
    for (const c of state.charts.values()) if (c.tab === state.tab) render(c);
  });
  document.getElementById("sample-filters").addEventListener("submit", e => {
    e.preventDefault();
    state.sample.offset = 0;
    loadSamples();
  });
  document.querySelector("#sample-filters select[name=run]").addEventListener("change", () => {
    state.sample.offset = 0;
    loadSamples();
  });
  document.getElementById("prev").addEventListener("click", () => {
    state.sample.offset = Math.max(0, state.sample.offset - PAGE);
    loadSampleList();
  });
  document.getElementById("next").addEventListener("click", () => {
    if (state.sample.offset + PAGE < state.sample.total) {
      state.sample.offset += PAGE;
      loadSampleList();
    }
  });
  let resize = null;
  window.addEventListener("resize", () => {
    clearTimeout(resize);
    resize = setTimeout(() => {
      for (const c of state.charts.values()) if (c.tab === state.tab) render(c);
    }, 200);
  });
  setInterval(updateLive, 1000);
  setInterval(refreshRuns, 10000);
}

async function refreshRuns() {
  state.runs = (await api("runs")).runs;
  drawRuns();
  fillSampleRuns();
}

async function start() {
  wire();
  state.smoothing = +document.getElementById("smoothing").value;
  await refreshRuns();
  const asked = new URLSearchParams(location.search)
    .getAll("run")
    .filter(id => state.runs.some(r => r.id === id));
  await selectRuns(asked.length ? asked : state.runs.slice(0, 1).map(r => r.id));
  drawRuns();
  document.body.dataset.ready = "1";
}

// What tests and scripts read from the page: the charts drawn and the points each curve holds.
window.cwDash = {
  charts: () =>
    [...state.charts.values()].map(c => ({key: c.key, title: c.title, tab: c.tab, points: c.points || {}})),
  liveEvents: () => state.live.events,
  showTab,
};

start().catch(err => {
  document
    .querySelector("main")
    .prepend(el("p", {class: "empty", text: `The dashboard could not load: ${err.message}`}));
});
