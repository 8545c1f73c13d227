// Flywheel dashboard: a single page over the controller's JSON API (/api/v1/...), refreshed
// live from its Server-Sent Events stream. Charts are uPlot, served by the controller itself.
"use strict";

const COLORS = ["#2f6fd6", "#2e9d5b", "#d0423c", "#c98a12", "#7a4fd0", "#1a9fb0", "#b0458f", "#6b7385"];
const state = {
  token: localStorage.getItem("flywheel.token") || "",
  who: null,
  events: null,
  busy: false,
  again: false,
  view: null,
  // Round cards never change once written: fetched once, by campaign and round.
  cards: {},
  cardRound: {},
};

const $ = (sel, el = document) => el.querySelector(sel);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const badge = (s) => `<span class="badge s-${esc(s)}">${esc(s || "-")}</span>`;
const short = (id) => (id ? esc(id.slice(0, 8)) : "-");
const time = (t) => (t ? new Date(t).toLocaleString() : "-");
const secs = (a, b) => (a && b ? (new Date(b) - new Date(a)) / 1000 : null);
const fmtSecs = (s) => (s == null ? "-" : s < 120 ? `${s.toFixed(1)} s` : `${(s / 60).toFixed(1)} min`);
const num = (v) => (v == null ? "-" : Math.abs(v) >= 100 ? v.toFixed(0) : v.toFixed(3));

async function api(path, options = {}) {
  const res = await fetch(path, {
    ...options,
    headers: { Authorization: `Bearer ${state.token}`, "Content-Type": "application/json" },
  });
  const body = await res.json().catch(() => ({}));
  if (!res.ok) {
    const err = new Error(body.error || `${res.status} ${res.statusText}`);
    err.status = res.status;
    throw err;
  }
  return body;
}

// ---------------------------------------------------------------- sign-in and live stream

async function signIn(token) {
  state.token = token;
  try {
    state.who = await api("/api/v1/whoami");
  } catch (e) {
    state.who = null;
    state.token = "";
    localStorage.removeItem("flywheel.token");
    showLogin(e.status === 401 ? "That token is not known to this controller." : e.message);
    return;
  }
  localStorage.setItem("flywheel.token", token);
  $("#login").hidden = true;
  $("#signout").hidden = false;
  $("#who").textContent = `${state.who.name} (${state.who.scope})`;
  connectEvents();
  refresh();
}

function showLogin(message) {
  $("#login").hidden = false;
  $("#signout").hidden = true;
  $("#who").textContent = "";
  $("#view").innerHTML = "";
  $("#login-error").textContent = message || "";
}

function connectEvents() {
  if (state.events) state.events.close();
  const es = new EventSource(`/api/v1/stream?access_token=${encodeURIComponent(state.token)}`);
  es.onopen = () => $("#live").classList.add("on");
  es.onerror = () => $("#live").classList.remove("on");
  es.addEventListener("change", () => refresh());
  es.addEventListener("tick", () => refresh());
  state.events = es;
}

// One refresh at a time; a request during one runs once more after it.
async function refresh() {
  if (!state.who) return;
  if (state.busy) {
    state.again = true;
    return;
  }
  state.busy = true;
  try {
    await render();
  } catch (e) {
    if (e.status === 401) {
      showLogin("The token was refused; sign in again.");
      return;
    }
    const el = $("#view-error");
    if (el) el.textContent = e.message;
  } finally {
    state.busy = false;
    if (state.again) {
      state.again = false;
      refresh();
    }
  }
}

// ---------------------------------------------------------------- routing

function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/");
  return { page: parts[0] || "campaigns", id: parts[1] || "" };
}

async function render() {
  const r = route();
  const key = `${r.page}/${r.id}`;
  if (state.view !== key) {
    state.view = key;
    state.chartKey = null;
    $("#view").innerHTML = "";
  }
  if (r.page === "campaign") return renderCampaign(r.id);
  if (r.page === "workers") return renderWorkers();
  if (r.page === "task") return renderTask(r.id);
  return renderCampaigns();
}

function section(id, html) {
  let el = document.getElementById(id);
  if (!el) {
    el = document.createElement("div");
    el.id = id;
    $("#view").appendChild(el);
  }
  if (el.dataset.html !== html) {
    el.innerHTML = html;
    el.dataset.html = html;
  }
  return el;
}

// ---------------------------------------------------------------- campaigns list

async function renderCampaigns() {
  const [{ campaigns = [] }, { schedules = [] }] = await Promise.all([
    api("/api/v1/campaigns"),
    api("/api/v1/schedules"),
  ]);
  section("head", `<h1>Campaigns</h1><p id="view-error" class="error"></p>`);
  section(
    "campaign-list",
    `<table><thead><tr><th>Name</th><th>Status</th><th>Round</th><th>Generator</th><th>Updated</th><th>Id</th></tr></thead><tbody>${campaigns
      .map(
        (c) => `<tr class="link" data-id="${esc(c.id)}" data-href="#/campaign/${esc(c.id)}">
          <td class="name">${esc(c.name)}</td><td>${badge(c.status)}</td>
          <td>${c.current_round + 1} / ${c.rounds_total}</td>
          <td class="mono">${esc(c.current_generator_uri)}</td><td>${time(c.updated_at)}</td>
          <td class="mono">${short(c.id)}</td></tr>`,
      )
      .join("")}</tbody></table>${campaigns.length ? "" : `<p class="muted">No campaigns yet: <code>flywheel campaign create -f spec.yaml</code>.</p>`}`,
  );
  section(
    "schedule-list",
    `<h2>Schedules</h2>${
      schedules.length
        ? `<table><thead><tr><th>Name</th><th>Status</th><th>Cron</th><th>Time zone</th><th>Mode</th><th>Overlap</th><th>Next firings</th></tr></thead><tbody>${schedules
            .map(
              (s) => `<tr><td>${esc(s.name)}</td><td>${badge(s.status)}</td><td class="mono">${esc(s.cron)}</td>
              <td>${esc(s.time_zone)}</td><td>${esc(s.mode)}</td><td>${esc(s.overlap)}</td>
              <td>${s.upcoming.slice(0, 3).map(time).join("<br>") || "-"}</td></tr>`,
            )
            .join("")}</tbody></table>`
        : `<p class="muted">No schedules.</p>`
    }`,
  );
}

// ---------------------------------------------------------------- one campaign

const stageSeconds = (stage) => {
  const starts = stage.tasks.map((t) => t.started_at).filter(Boolean).sort();
  const ends = stage.tasks.map((t) => t.finished_at).filter(Boolean).sort();
  if (!starts.length || ends.length < stage.tasks.length) return null;
  return secs(starts[0], ends[ends.length - 1]);
};

async function renderCampaign(id) {
  const [detail, { artifacts = [] }, { events = [] }] = await Promise.all([
    api(`/api/v1/campaigns/${id}`),
    api(`/api/v1/campaigns/${id}/artifacts`),
    api(`/api/v1/campaigns/${id}/events?limit=5000`),
  ]);
  const c = detail.campaign;
  const rounds = detail.rounds || [];
  const admin = state.who.scope === "admin";
  const actions = [];
  if (c.status === "running") actions.push(["pause", "Pause"]);
  if (c.status === "paused") actions.push(["resume", "Resume"]);
  if (!["succeeded", "cancelled"].includes(c.status)) actions.push(["cancel", "Cancel"]);
  section(
    "head",
    `<h1><span id="campaign-name">${esc(c.name)}</span> <span id="campaign-status">${badge(c.status)}</span></h1>
     <p class="muted">round ${c.current_round + 1} of ${c.rounds_total} · generator <code>${esc(c.current_generator_uri)}</code> · id <code>${esc(c.id)}</code></p>
     <p class="actions">${actions
       .map(([a, label]) => `<button data-action="${a}" ${admin ? "" : 'disabled title="needs an admin token"'} class="${a === "cancel" ? "danger" : ""}">${label}</button>`)
       .join("")}</p><p id="view-error" class="error"></p>`,
  );
  section(
    "rounds",
    `<h2>Rounds</h2><div class="timeline">${rounds
      .map(
        (r) => `<div class="round" data-index="${r.index}" data-status="${esc(r.status)}">
          <b>Round ${r.index + 1}</b> ${badge(r.status)} ${r.decision ? badge(r.decision) : ""}
          <div class="muted">${time(r.started_at)} · ${fmtSecs(secs(r.started_at, r.finished_at))}</div>
          <div class="muted" title="${esc(r.decision_reason)}">${esc(r.decision_reason).slice(0, 80)}</div></div>`,
      )
      .join("")}</div>`,
  );
  renderCharts(rounds);
  const current = rounds[rounds.length - 1];
  section("dag", current ? `<h2>Round ${current.index + 1}: stages</h2>${dagSvg(current)}${stageTable(current, admin)}` : "");
  section("lineage", lineage(rounds, artifacts));
  await renderCards(id, rounds);
  section(
    "events",
    `<h2>Events</h2><table><thead><tr><th>Time</th><th>Event</th><th>By</th><th>Message</th></tr></thead><tbody>${events
      .slice(-25)
      .reverse()
      .map((e) => `<tr><td>${time(e.created_at)}</td><td>${esc(e.kind)}</td><td>${esc(e.actor)}</td><td>${esc(e.message)}</td></tr>`)
      .join("")}</tbody></table>`,
  );
}

// Each finished round's data card and model card (markdown, fetched once: they never change).
async function renderCards(id, rounds) {
  const done = rounds.filter((r) => r.status === "succeeded");
  if (!done.length) return section("round-cards", "");
  const chosen = done.some((r) => r.index === state.cardRound[id]) ? state.cardRound[id] : done[done.length - 1].index;
  const key = `${id}/${chosen}`;
  state.cards[key] ??= (await api(`/api/v1/campaigns/${id}/rounds/${chosen}/cards`)).cards || [];
  const titles = { data: "Data card", model: "Model card" };
  section(
    "round-cards",
    `<h2>Round ${chosen + 1}: data and model cards</h2><p class="actions">${done
      .map((r) => `<button data-card-round="${r.index}" class="${r.index === chosen ? "active" : ""}">Round ${r.index + 1}</button>`)
      .join("")}</p><div class="cards" data-round="${chosen}">${state.cards[key]
      .map((c) => `<div class="card round-card" data-kind="${esc(c.kind)}"><h3>${titles[c.kind] || esc(c.kind)}</h3>
        <pre>${esc(c.markdown)}</pre><p class="muted mono">sha256 ${esc(c.content_hash)}</p></div>`)
      .join("")}</div>`,
  );
}

function renderCharts(rounds) {
  const settled = rounds.filter((r) => Object.keys(r.metrics || {}).length);
  const keys = [...new Set(settled.flatMap((r) => Object.keys(r.metrics)))].sort();
  const pick = (re) => keys.filter((k) => re.test(k));
  const sizes = pick(/(records|prompts|responses)(_total)?$/).filter((k) => !k.endsWith("_total") ? !keys.includes(`${k}_total`) : true);
  const stageNames = [...new Set(rounds.flatMap((r) => r.stages.map((s) => s.name)))];
  const charts = [
    { title: "Accuracy and win rate", keys: pick(/\.(accuracy|win_rate)$/) },
    { title: "Mean reward", keys: pick(/\.mean_reward$/) },
    // 24,000 responses and 1,800 SFT records: a log axis keeps the small series readable.
    { title: "Dataset sizes", keys: sizes, log: true },
    // synthesize_prompts on openai: prompts kept per pipeline, and what each step removed.
    { title: "Synthetic prompts by pipeline", keys: pick(/\.prompts_[a-z_]+$/) },
    { title: "Prompts removed", keys: pick(/\.(removed_exact|removed_near|removed_earlier_round|removed_contaminated|conversion_failures)$/) },
  ];
  // The flywheel's own health, per round: what the filter accepted, how rewards, lengths and
  // diversity move, whether the reward model still agrees with the checkers, what it cost.
  const analytics = [
    { title: "Acceptance at each filter step", keys: pick(/\.(verified_sample_rate|sft_verified_rate|sft_min_reward_rate|sft_acceptance_rate|pair_distinct_rate|pair_margin_rate|pair_acceptance_rate)$/) },
    { title: "Reward distribution", keys: pick(/\.(reward_p10|reward_p50|reward_p90|reward_mean|reward_std|sft_reward_mean)$/) },
    { title: "Response length (characters)", keys: pick(/\.(response_chars_mean|sft_response_chars_mean|chosen_chars_mean|rejected_chars_mean)$/) },
    { title: "Diversity", keys: pick(/\.(prompt_distinct_2|response_distinct_1|response_distinct_2|prompt_near_duplicate_rate|response_repeat_rate)$/) },
    { title: "Reward model agreement with checkers", keys: pick(/\.rm_checker_agreement$/) },
    { title: "Win rate with its 95% interval", keys: pick(/\.win_rate(_ci_low|_ci_high)?$/) },
    { title: "Drift from the previous round: rewards and rates", keys: pick(/\.(reward_[a-z0-9]+|rm_checker_agreement|sft_acceptance_rate|pair_acceptance_rate|response_distinct_2|prompt_distinct_2)_drift$/) },
    { title: "Drift from the previous round: length", keys: pick(/\.response_(chars|words)_mean_drift$/) },
    { title: "Cost per accepted sample (s)", keys: pick(/^round\.(worker|gpu)_seconds_per_accepted$/) },
  ];
  const signature = JSON.stringify([settled.map((r) => [r.index, r.metrics]), rounds.map((r) => r.stages.map(stageSeconds))]);
  if (state.chartKey === signature) return;
  state.chartKey = signature;
  // Rounds count from 1 here as in the CLI and the demo's summary.
  const xs = settled.map((r) => r.index + 1);
  const draw = (id, heading, list) => {
    const el = section(id, `<h2>${heading}</h2><div class="cards"></div>`);
    const cards = $(".cards", el);
    cards.innerHTML = "";
    for (const ch of list) {
      if (!ch.keys.length || !xs.length) continue;
      plot(cards, ch.title, xs, ch.keys.map((k) => ({ label: k, values: settled.map((r) => r.metrics[k] ?? null) })), { log: ch.log });
    }
    return cards;
  };
  const cards = draw("charts", "Per round", charts);
  const rx = rounds.map((r) => r.index + 1);
  plot(
    cards,
    "Stage durations (s)",
    rx,
    stageNames.map((n) => ({ label: n, values: rounds.map((r) => { const s = r.stages.find((x) => x.name === n); return s ? stageSeconds(s) : null; }) })),
  );
  draw("analytics", "Flywheel analytics", analytics);
}

// 20000 -> "20k", 1500000 -> "1.5M", 0.25 -> "0.25": short enough for the axis.
function compact(v) {
  if (v == null) return "";
  const a = Math.abs(v);
  const cut = (x) => String(Number(x.toFixed(1)));
  if (a >= 1e6) return `${cut(v / 1e6)}M`;
  if (a >= 1e3) return `${cut(v / 1e3)}k`;
  return String(Number(v.toFixed(2)));
}

function plot(parent, title, xs, series, { log = false } = {}) {
  const card = document.createElement("div");
  card.className = "card chart";
  card.dataset.title = title;
  card.dataset.scale = log ? "log" : "linear";
  card.innerHTML = `<h3>${esc(title)}</h3>`;
  parent.appendChild(card);
  const width = Math.max(360, card.clientWidth - 20);
  // A log axis cannot show 0: such points are left out rather than drawn at a false value.
  const values = series.map((s) => (log ? s.values.map((v) => (v > 0 ? v : null)) : s.values));
  const opts = {
    width,
    height: 220,
    scales: { x: { time: false }, y: log ? { distr: 3, log: 10 } : {} },
    axes: [
      { label: "round", values: (u, ticks) => ticks.map((t) => (Number.isInteger(t) ? t : "")) },
      { size: 56, values: (u, ticks) => ticks.map(compact) },
    ],
    series: [{ label: "round" }, ...series.map((s, i) => ({ label: s.label, stroke: COLORS[i % COLORS.length], width: 2, points: { show: true, size: 6 } }))],
  };
  new uPlot(opts, [xs, ...values], card);
}

// The round's stage DAG: columns by depth (longest chain of needs), edges from each need.
function dagSvg(round) {
  const stages = round.stages;
  const depth = {};
  for (const s of stages) depth[s.name] = Math.max(0, ...s.needs.map((n) => (depth[n] ?? -1) + 1));
  const columns = {};
  const pos = {};
  const W = 170, H = 46, GX = 40, GY = 14;
  for (const s of stages) {
    const d = depth[s.name];
    const row = (columns[d] = (columns[d] ?? -1) + 1);
    pos[s.name] = { x: 10 + d * (W + GX), y: 10 + row * (H + GY) };
  }
  const width = 20 + (Math.max(...Object.values(depth)) + 1) * (W + GX);
  const height = 20 + (Math.max(...Object.values(columns)) + 1) * (H + GY);
  const color = { succeeded: "#2e9d5b", running: "#2f6fd6", failed: "#d0423c", cancelled: "#d0423c", queued: "#c98a12", waiting_for_worker: "#c98a12" };
  const edges = stages.flatMap((s) =>
    s.needs.filter((n) => pos[n]).map((n) => {
      const a = pos[n], b = pos[s.name];
      const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2, mx = (x1 + x2) / 2;
      return `<path d="M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}"/>`;
    }),
  );
  const boxes = stages.map((s) => {
    const p = pos[s.name];
    const done = s.tasks.filter((t) => t.state === "succeeded").length;
    return `<g class="stage" data-name="${esc(s.name)}" data-state="${esc(s.state)}">
      <rect x="${p.x}" y="${p.y}" width="${W}" height="${H}" rx="5" fill="${color[s.state] || "#9aa1ad"}"/>
      <text x="${p.x + 8}" y="${p.y + 18}" font-weight="600">${esc(s.name)}</text>
      <text x="${p.x + 8}" y="${p.y + 36}">${esc(s.kind)} · ${done}/${s.tasks.length}</text><title>${esc(s.state)}</title></g>`;
  });
  return `<div class="dag"><svg width="${width}" height="${height}">${edges.join("")}${boxes.join("")}</svg></div>`;
}

function stageTable(round, admin) {
  const rows = round.stages.flatMap((s) =>
    s.tasks.map(
      (t, i) => `<tr class="link" data-href="#/task/${esc(t.id)}">
        <td>${i === 0 ? esc(s.name) : ""}</td><td>${t.shard_index + 1}/${t.shard_count}</td><td>${badge(t.state)}</td>
        <td>${t.attempt}/${t.max_attempts}</td>
        <td><div class="progress"><div style="width:${Math.round(100 * t.progress)}%"></div></div></td>
        <td>${fmtSecs(secs(t.started_at, t.finished_at))}</td><td class="error">${esc(t.last_error)}</td>
        <td>${i === 0 && ["failed", "cancelled"].includes(s.state) ? `<button data-retry="${esc(s.name)}" data-round="${round.index}" ${admin ? "" : "disabled"}>Retry stage</button>` : ""}</td></tr>`,
    ),
  );
  return `<table><thead><tr><th>Stage</th><th>Shard</th><th>State</th><th>Attempt</th><th>Progress</th><th>Duration</th><th>Error</th><th></th></tr></thead><tbody>${rows.join("")}</tbody></table>`;
}

// Which model generated which data, trained from what, promoted when.
function lineage(rounds, artifacts) {
  const byId = Object.fromEntries(artifacts.map((a) => [a.id, a]));
  const name = (id) => (byId[id] ? `${esc(byId[id].name)}${byId[id].round_index >= 0 && byId[id].producer_stage ? ` <span class="muted">r${byId[id].round_index + 1}</span>` : ""}` : short(id));
  const promoted = Object.fromEntries(rounds.filter((r) => r.decision && r.trained_model_id).map((r) => [r.trained_model_id, r]));
  const generatorOf = Object.fromEntries(rounds.map((r) => [r.index, r.generator_id]));
  const rows = artifacts.map((a) => {
    const p = promoted[a.id];
    const verdict = p ? `${badge(p.decision)} after round ${p.index + 1}` : a.producer_stage ? "" : '<span class="muted">starting model</span>';
    return `<tr data-kind="${esc(a.kind)}"><td>${a.producer_stage ? a.round_index + 1 : "-"}</td><td>${esc(a.kind)}</td><td>${esc(a.name)}</td>
      <td>${esc(a.producer_stage || "-")}</td><td>${a.parent_ids.map(name).join(", ") || "-"}</td>
      <td>${a.generator_id ? name(a.generator_id) : a.producer_stage ? name(generatorOf[a.round_index]) : "-"}</td>
      <td>${verdict}</td><td class="mono" title="${esc(a.uri)}">${esc(a.content_hash).slice(0, 19)}</td></tr>`;
  });
  return `<h2>Lineage</h2><table><thead><tr><th>Round</th><th>Kind</th><th>Artifact</th><th>Stage</th><th>From</th><th>Generator</th><th>Promotion</th><th>Content hash</th></tr></thead><tbody>${rows.join("")}</tbody></table>`;
}

// ---------------------------------------------------------------- workers and tasks

async function renderWorkers() {
  const { workers = [] } = await api("/api/v1/workers");
  section("head", `<h1>Workers</h1><p id="view-error" class="error"></p>`);
  section(
    "worker-list",
    `<table><thead><tr><th>Name</th><th>Pool</th><th>Backends</th><th>GPU</th><th>Slots</th><th>Status</th><th>Heartbeat age</th><th>Current tasks</th></tr></thead><tbody>${workers
      .map(
        (w) => `<tr data-name="${esc(w.name)}"><td>${esc(w.name)}</td><td>${esc(w.pool)}</td><td>${esc(w.backends.join(", "))}</td>
        <td>${w.gpu_count ? `${w.gpu_count}× ${esc(w.gpu_kind)}` : "-"}</td><td>${w.slots}</td><td>${badge(w.status)}</td>
        <td>${w.heartbeat_age_s.toFixed(1)} s</td>
        <td>${w.current_tasks.map((t) => `<a href="#/task/${esc(t)}" class="mono">${short(t)}</a>`).join(" ") || "-"}</td></tr>`,
      )
      .join("")}</tbody></table>`,
  );
}

async function renderTask(id) {
  const d = await api(`/api/v1/tasks/${id}`);
  const t = d.task;
  const json = (s) => esc(JSON.stringify(JSON.parse(s || "{}"), null, 2));
  section(
    "head",
    `<h1>Task ${esc(d.stage)} shard ${t.shard_index + 1}/${t.shard_count} ${badge(t.state)}</h1>
     <p class="muted">round ${d.round_index + 1} of <a href="#/campaign/${esc(d.campaign_id)}">campaign ${short(d.campaign_id)}</a> ·
     ${esc(d.kind)} on pool ${esc(d.pool)} (backend ${esc(d.backend)}) · attempt ${t.attempt} of ${t.max_attempts}</p>
     <div class="progress" style="max-width:400px"><div style="width:${Math.round(100 * t.progress)}%"></div></div>
     <p>${esc(t.progress_message)}</p><p class="error">${esc(t.last_error)}</p><p id="view-error" class="error"></p>`,
  );
  section(
    "attempts",
    `<h2>Attempts</h2><table><thead><tr><th>#</th><th>Worker</th><th>State</th><th>Started</th><th>Duration</th><th>Cluster job</th><th>Error</th></tr></thead><tbody>${d.attempts
      .map((a) => `<tr><td>${a.attempt}</td><td class="mono">${short(a.worker_id)}</td><td>${badge(a.state)}</td><td>${time(a.started_at)}</td><td>${fmtSecs(secs(a.started_at, a.finished_at))}</td><td class="mono">${esc(a.external_job || "")}</td><td class="error">${esc(a.error)}</td></tr>`)
      .join("")}</tbody></table>`,
  );
  section(
    "task-metrics",
    `<div class="cards"><div class="card"><h3>Progress metrics</h3><pre>${json(d.progress_metrics_json)}</pre></div>
     <div class="card"><h3>Metrics</h3><pre>${json(d.metrics_json)}</pre></div>
     <div class="card"><h3>Params</h3><pre>${json(d.params_json)}</pre></div></div>`,
  );
}

// ---------------------------------------------------------------- wiring

document.addEventListener("click", async (ev) => {
  const action = ev.target.closest("button[data-action]");
  const retry = ev.target.closest("button[data-retry]");
  if (!action && !retry) return;
  ev.stopPropagation();
  const { id } = route();
  try {
    if (action) {
      const verb = action.dataset.action;
      if (verb === "cancel" && !confirm("Cancel this campaign? Running tasks are told to stop.")) return;
      await api(`/api/v1/campaigns/${id}/${verb}`, { method: "POST", body: JSON.stringify({ reason: "from the dashboard" }) });
    } else {
      await api(`/api/v1/campaigns/${id}/retry-stage`, {
        method: "POST",
        body: JSON.stringify({ round_index: Number(retry.dataset.round), stage: retry.dataset.retry }),
      });
    }
  } catch (e) {
    $("#view-error").textContent = e.message;
    return;
  }
  refresh();
}, true);

$("#login-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  signIn($("#token").value.trim());
});
$("#signout").addEventListener("click", () => {
  localStorage.removeItem("flywheel.token");
  state.token = "";
  state.who = null;
  if (state.events) state.events.close();
  showLogin("");
});
window.addEventListener("hashchange", () => refresh());

if (state.token) signIn(state.token);
else showLogin("");

// Table rows link with data-href: the page's Content-Security-Policy allows no inline handlers.
document.addEventListener("click", (e) => {
  const row = e.target.closest("tr[data-href]");
  if (row) location.hash = row.dataset.href;
  const card = e.target.closest("button[data-card-round]");
  if (card) {
    state.cardRound[route().id] = Number(card.dataset.cardRound);
    refresh();
  }
});
