// streamrec page. Plain JS, no dependencies; every request goes to this origin's /api.
"use strict";

const POLL_MS = 2500;
const SAVE_DEBOUNCE_MS = 600;
const STEPS = [0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5];

const state = {
  visitor: null,
  tokenRequired: false,
  maxBatch: 500,
  token: sessionStorage.getItem("streamrec:token") || "",
  mine: new Map(),          // item -> {item, rating, title, genres, timestamp, status}
  saveTimer: null,
  saving: false,
  model: null,              // last /api/model answer
  recsKey: "",              // what #recs shows now, to avoid re-rendering the same list
  foldinKey: "",            // ratings + version the last fold-in was computed for
  search: { q: "", genre: "", offset: 0, total: 0 },
  widgetSeq: 0,
  ratingMin: 0.5,           // the rating scale, from /api/config
  ratingMax: 5,
};

const $ = (id) => document.getElementById(id);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("data-") || k.startsWith("aria-") || k === "for" || k === "role") node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
}

// ---- talking to our API -------------------------------------------------------------------

async function api(path, options = {}) {
  try {
    const resp = await fetch(path, { credentials: "same-origin", ...options });
    let body = null;
    try { body = await resp.json(); } catch (_) { body = null; }
    return { ok: resp.ok, status: resp.status, body };
  } catch (err) {
    return { ok: false, status: 0, body: { error: "network", detail: "the frontend is not reachable" } };
  }
}

const problems = new Map();  // source -> message; the banner shows them all

function setProblem(source, message) {
  if (message) problems.set(source, message); else problems.delete(source);
  const banner = $("banner");
  $("banner-text").textContent = [...problems.values()].join(" ");
  banner.hidden = problems.size === 0;
  $("retry").hidden = !problems.has("write");
}

function readProblem(resp) {
  if (resp.ok) { setProblem("read", null); return; }
  if (resp.status === 503 || resp.status === 502 || resp.status === 0) {
    setProblem("read", "The recommendation service (predictor) is not reachable right now; "
      + "showing what we had. It will refresh by itself.");
  }
}

// Error bodies are {"error", "detail"}; the predictor's detail may be an object.
function describe(resp, fallback) {
  const b = resp.body || {};
  if (typeof b.detail === "string" && b.detail) return b.detail;
  if (b.error) return b.detail ? `${b.error}: ${JSON.stringify(b.detail)}` : String(b.error);
  return fallback;
}

function announce(text) { $("live").textContent = text; }

// ---- star widget ---------------------------------------------------------------------------

function fmtStars(v) { return `${Number(v).toFixed(1)}★`; }

function paint(widget, value, cls) {
  for (const label of widget.querySelectorAll("label")) {
    label.classList.toggle(cls, Number(label.dataset.value) <= value);
  }
}

function starWidget(movie) {
  const id = `w${++state.widgetSeq}`;
  const fs = el("fieldset", { class: "stars", "data-item": movie.item });
  fs.append(el("legend", { class: "visually-hidden", text: `Your rating for ${movie.title || movie.item}` }));
  const current = state.mine.get(movie.item);
  for (const v of STEPS) {
    const input = el("input", { type: "radio", name: id, id: `${id}-${v}`, value: String(v) });
    input.checked = current != null && current.rating === v;
    const label = el("label", { for: `${id}-${v}`, class: Number.isInteger(v) ? "r" : "l",
      "data-value": String(v), title: `${v} stars` });
    label.append(el("span", { class: "visually-hidden", text: `${v} star${v === 1 ? "" : "s"}` }));
    input.addEventListener("change", () => rate(movie, v));
    label.addEventListener("mouseenter", () => { fs.classList.add("preview"); paint(fs, v, "hover"); });
    fs.append(input, label);
  }
  fs.addEventListener("mouseleave", () => { fs.classList.remove("preview"); paint(fs, 0, "hover"); });
  const value = el("span", { class: "stars-value", "aria-hidden": "true", text: current ? fmtStars(current.rating) : "" });
  fs.append(value);
  paint(fs, current ? current.rating : 0, "on");
  return fs;
}

function syncWidgets(item) {
  const r = state.mine.get(item);
  for (const fs of document.querySelectorAll(`fieldset.stars[data-item="${CSS.escape(item)}"]`)) {
    for (const input of fs.querySelectorAll("input")) input.checked = r != null && Number(input.value) === r.rating;
    paint(fs, r ? r.rating : 0, "on");
    fs.querySelector(".stars-value").textContent = r ? fmtStars(r.rating) : "";
  }
  for (const s of document.querySelectorAll(`.rate-status[data-item="${CSS.escape(item)}"]`)) statusText(s, r);
}

function statusText(node, r) {
  node.className = "rate-status" + (r ? ` ${r.status}` : "");
  node.textContent = !r ? "" : r.status === "saved" ? "saved" : r.status === "saving" ? "saving…" : "not saved";
}

function movieRow(movie, extra) {
  const info = el("div", { class: "movie-info" },
    el("span", { class: "title", text: movie.title || `item ${movie.item}` }),
    el("span", { class: "genres", text: (movie.genres || []).join(" · ") }));
  if (extra) info.append(el("span", { class: "score", text: extra.text, title: extra.title || "" }));
  const status = el("span", { class: "rate-status", "data-item": movie.item, "aria-live": "polite" });
  statusText(status, state.mine.get(movie.item));
  return el("li", { class: "movie", "data-item": movie.item }, info, starWidget(movie), status);
}

function readonlyRow(movie, extra) {
  return el("li", { class: "movie", "data-item": movie.item },
    el("div", { class: "movie-info" },
      el("span", { class: "title", text: movie.title || `item ${movie.item}` }),
      el("span", { class: "genres", text: (movie.genres || []).join(" · ") })),
    el("span", { class: "readonly-stars", text: extra }));
}

// ---- rating: optimistic locally, accepted only on 202 ---------------------------------------

function loadMine() {
  try {
    const saved = JSON.parse(localStorage.getItem(`streamrec:ratings:${state.visitor}`) || "[]");
    for (const r of saved) state.mine.set(r.item, { ...r, status: r.status === "saved" ? "saved" : "unsaved" });
  } catch (_) { /* a corrupt entry is just forgotten */ }
}

function storeMine() {
  localStorage.setItem(`streamrec:ratings:${state.visitor}`, JSON.stringify([...state.mine.values()]));
}

function rate(movie, value) {
  state.mine.set(movie.item, { item: movie.item, rating: value, title: movie.title, genres: movie.genres || [],
    timestamp: Math.floor(Date.now() / 1000), status: "saving" });
  storeMine();
  syncWidgets(movie.item);
  renderMine();
  clearTimeout(state.saveTimer);
  // Arrow keys change the radio on every press; wait for the visitor to settle on a value.
  state.saveTimer = setTimeout(saveRatings, SAVE_DEBOUNCE_MS);
}

async function saveRatings() {
  if (state.saving) { state.saveTimer = setTimeout(saveRatings, SAVE_DEBOUNCE_MS); return; }
  // One request = one user's ratings = one record batch on the broker (all or nothing).
  const batch = [...state.mine.values()].filter((r) => r.status !== "saved").slice(0, state.maxBatch);
  if (!batch.length) return;
  state.saving = true;
  const headers = { "Content-Type": "application/json" };
  if (state.token) headers["Authorization"] = `Bearer ${state.token}`;
  const sent = batch.map((r) => ({ item: r.item, rating: r.rating, timestamp: r.timestamp }));
  const resp = await api("/api/ratings", { method: "POST", headers, body: JSON.stringify(sent) });
  state.saving = false;
  for (const r of batch) {
    const now = state.mine.get(r.item);
    // Only mark what we actually sent; a newer value chosen meanwhile stays pending.
    if (now && now.rating === r.rating && now.timestamp === r.timestamp) now.status = resp.status === 202 ? "saved" : "unsaved";
    syncWidgets(r.item);
  }
  storeMine();
  renderMine();
  if (resp.status === 202) {
    setProblem("write", null);
    announce(`${batch.length} rating${batch.length > 1 ? "s" : ""} saved.`);
    refreshRecs(true);
  } else if (resp.status === 401 || resp.status === 403) {
    $("token-box").hidden = false;
    setProblem("write", "Saving ratings needs a write token on this server; your ratings were NOT saved.");
  } else if (resp.status === 422) {
    setProblem("write", `Rating rejected: ${describe(resp, "invalid rating")}`);
  } else {
    setProblem("write", "Your ratings could not be stored (the message broker is unreachable); "
      + "they were NOT accepted. Use “Retry saving” in a moment.");
  }
  if ([...state.mine.values()].some((r) => r.status === "saving")) state.saveTimer = setTimeout(saveRatings, SAVE_DEBOUNCE_MS);
}

function savedRatings() {
  return [...state.mine.values()].filter((r) => r.status === "saved");
}

function renderMine() {
  const list = $("my-ratings");
  const all = [...state.mine.values()].sort((a, b) => b.timestamp - a.timestamp);
  $("my-count").textContent = String(all.length);
  $("mine-empty").hidden = all.length > 0;
  const key = JSON.stringify(all.map((r) => [r.item, r.rating, r.status]));
  if (list.dataset.key === key) return;
  // Re-rendering would drop keyboard focus inside the list; keep the focused item in place.
  const focusedItem = list.contains(document.activeElement) ? document.activeElement.closest("[data-item]")?.dataset.item : null;
  list.dataset.key = key;
  list.replaceChildren(...all.map((r) => movieRow(r)));
  if (focusedItem) list.querySelector(`fieldset[data-item="${CSS.escape(focusedItem)}"] input:checked`)?.focus();
}

// ---- recommendations --------------------------------------------------------------------------

// Keyboard focus inside (a mouse click also focuses a radio, but that is not :focus-visible).
function keyboardIn(node) { return node.querySelector(":focus-visible") != null; }

const STRATEGY_LABEL = { model: "model", fold_in: "instant (fold-in)", popular: "popular" };

// What a list item was served with, labelled so a ranking score is never read as a rating:
// "predicted 4.3★" is the rating model's guess (the predictor clips it to the scale; clipped
// here again so the page can never show more than the top of the scale), "match 0.82" is
// the ranking model's score (x·y, not a rating), popular items show how often they were rated.
function servedLabel(m, strategy) {
  if (strategy === "popular") return m.count != null ? `${fmt(m.count)} ratings` : null;
  const parts = [];
  if (m.rating != null) {
    const r = Math.min(state.ratingMax, Math.max(state.ratingMin, Number(m.rating)));
    parts.push(`predicted ${fmtStars(r)}`);
  }
  if (m.score != null && m.rating == null) parts.push(`match ${Number(m.score).toFixed(2)}`);
  return parts.join(" · ") || null;
}

function servedTitle(m, strategy) {
  if (strategy === "popular") return "Most rated items";
  const score = m.score != null ? `ranking score ${Number(m.score).toFixed(3)}` : "";
  const rating = m.rating != null ? `predicted rating ${Number(m.rating).toFixed(2)} on ${state.ratingMin}–${state.ratingMax}` : "no predicted rating";
  return [rating, score].filter(Boolean).join("; ");
}

function setBadge(node, strategy, version) {
  node.hidden = false;
  node.className = `badge ${strategy || ""}`;
  const v = version != null ? ` · v${version}` : "";
  node.textContent = `${STRATEGY_LABEL[strategy] || strategy || "–"}${v}`;
}

function renderRecs(answer, note) {
  const list = $("recs");
  // The model may not have learned the latest ratings yet: never recommend what was just rated.
  answer = { ...answer, items: answer.items.filter((i) => !state.mine.has(i.item)).slice(0, 10) };
  const key = JSON.stringify([answer.strategy, answer.version, answer.items.map((i) => i.item)]);
  // Don't yank the list from under the keyboard; the next poll renders it.
  if (key !== state.recsKey && keyboardIn(list)) return;
  setBadge($("recs-badge"), answer.strategy, answer.version);
  $("recs-note").textContent = note;
  list.dataset.strategy = answer.strategy;
  list.dataset.version = answer.version == null ? "" : String(answer.version);
  if (key === state.recsKey) return;
  state.recsKey = key;
  list.replaceChildren(...answer.items.map((m) => {
    const text = servedLabel(m, answer.strategy);
    return movieRow(m, text ? { text, title: servedTitle(m, answer.strategy) } : null);
  }));
}

async function refreshRecs(force = false) {
  const saved = savedRatings();
  if (!saved.length) {
    const pop = await api("/api/popular?n=10");
    readProblem(pop);
    if (pop.ok) renderRecs(pop.body, "Rate a few movies and this list becomes yours.");
    return;
  }
  const n = Math.min(100, 10 + state.mine.size);
  const mine = await api(`/api/recommendations?n=${n}`);
  readProblem(mine);
  if (mine.ok && mine.body.strategy === "model") {
    const learned = await api(`/api/users/${encodeURIComponent(state.visitor)}/ratings?limit=1`);
    const count = learned.ok ? (learned.body.total ?? learned.body.ratings.length) : null;
    const of = count == null ? "your ratings" : `${count} of your ${saved.length} rating${saved.length === 1 ? "" : "s"}`;
    renderRecs(mine.body, `From the streaming model, which has learned ${of} (model version ${mine.body.version}).`);
    return;
  }
  if (!mine.ok && mine.status >= 500) return;
  // Not learned yet: fold the visitor's ratings into the current item factors on the spot.
  const version = state.model ? state.model.version : null;
  const foldKey = JSON.stringify([saved.map((r) => [r.item, r.rating]), version]);
  if (!force && foldKey === state.foldinKey) return;
  const body = { ratings: saved.map((r) => ({ item: r.item, rating: r.rating })), n: 10, exclude_rated: true };
  const fold = await api("/api/fold-in", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  readProblem(fold);
  if (fold.ok) {
    state.foldinKey = foldKey;
    renderRecs(fold.body, "Computed at once from your ratings; the model will learn them in a moment.");
  } else if (mine.ok) {
    renderRecs(mine.body, "");
  }
}

async function refreshPopular() {
  const pop = await api("/api/popular?n=10");
  readProblem(pop);
  if (!pop.ok) return;
  const list = $("popular");
  const key = JSON.stringify(pop.body.items.map((i) => i.item));
  if (list.dataset.key === key || keyboardIn(list)) return;
  list.dataset.key = key;
  list.replaceChildren(...pop.body.items.map((m) => movieRow(m)));
}

// ---- model panel --------------------------------------------------------------------------

function fmt(n, digits = 0) {
  if (n == null || Number.isNaN(Number(n))) return "–";
  return Number(n).toLocaleString("en", { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

async function refreshModel() {
  const resp = await api("/api/model");
  readProblem(resp);
  if (!resp.ok) {
    $("model-status").textContent = resp.status === 503 && resp.body && resp.body.error !== "predictor_unavailable"
      ? "No model published yet: the modeler is still learning its first batch."
      : describe(resp, "The model is not available.");
    return;
  }
  const m = resp.body;
  const changed = !state.model || state.model.version !== m.version;
  state.model = m;
  const history = (m.history || []).slice().sort((a, b) => a.version - b.version);
  const last = history[history.length - 1] || {};
  const lastLag = [...history].reverse().find((h) => h.lag != null);
  // The modeler reports lag per partition ({"0": 12, ...}); the panel shows the total.
  const lagTotal = (lag) => (typeof lag === "object" ? Object.values(lag).reduce((a, b) => a + Number(b), 0) : lag);
  $("model-status").textContent = `Model version ${m.version}, published ${new Date(m.created * 1000).toLocaleTimeString()}.`;
  $("m-version").textContent = String(m.version);
  $("m-seen").textContent = fmt(m.ratings_seen);
  $("m-rate").textContent = fmt(last.ratings_per_s, 0);
  $("m-lag").textContent = lastLag ? fmt(lagTotal(lastLag.lag)) : "–";
  $("m-size").textContent = `${fmt(m.n_users)} × ${fmt(m.n_items)}`;
  $("m-rank").textContent = String(m.rank ?? "–");
  const badge = $("model-badge");
  badge.textContent = `model v${m.version}`;
  badge.className = "badge model";
  drawChart(history.filter((h) => h.prequential_rmse != null));
  renderCandidates(m.candidates || []);
  if (changed) refreshRecs();
}

// ---- the online hyper-parameter search: candidates and their scores over time ---------------

const CAND_COLOURS = ["#b5562b", "#2b6cb5", "#3f8f3a", "#8a4fb5", "#b58f2b", "#2b9fa8", "#b52b6c", "#6b6b6b"];

function fmtParams(params) {
  return Object.entries(params).map(([k, v]) => `${k}=${Number.isInteger(v) ? v : Number(v).toPrecision(3)}`).join(", ");
}

function renderCandidates(cands) {
  const panel = $("hp-panel");
  panel.hidden = cands.length === 0;
  if (!cands.length) return;
  const metric = cands[0].metric || "score";
  const live = cands.filter((c) => c.state === "live").length;
  const leader = cands.find((c) => c.served);
  $("hp-status").textContent = `${cands.length} candidates, ${live} live; serving ${leader ? leader.id : "–"} `
    + `(by ${metric}, ${metric === "rmse" ? "lower" : "higher"} is better).`;
  $("cand-metric").textContent = metric;
  const body = $("cand-table").tBodies[0];
  body.replaceChildren(...cands.map((c, j) => {
    const row = el("tr", { className: `cand ${c.state}${c.served ? " served" : ""}`, "data-cid": c.id },
      el("th", { scope: "row" }, el("span", { className: "swatch", style: `background:${CAND_COLOURS[j % CAND_COLOURS.length]}` }), ` ${c.id}`),
      el("td", {}, fmtParams(c.params)),
      el("td", {}, c.score == null ? "–" : Number(c.score).toFixed(4)),
      el("td", {}, c.served ? "served" : c.state));
    return row;
  }));
  drawCandidateChart(cands, metric);
}

// An emptied chart (its title and description kept) with both axes drawn: the SVG
// `${name}-chart` and its box (width W, height H, margins L R T B).
function chartFrame(name, left) {
  const chart = $(`${name}-chart`);
  const title = $(`${name}-title`), desc = $(`${name}-desc`);
  chart.replaceChildren(title, desc);
  const W = 360, H = 170, L = left, R = 10, T = 10, B = 30;
  chart.append(svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }),
               svg("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }));
  return { chart, desc, W, H, L, R, T, B };
}

function drawCandidateChart(cands, metric) {
  const { chart, desc, W, H, L, R, T, B } = chartFrame("cand", 44);
  const all = cands.flatMap((c) => c.history || []);
  if (!all.length) {
    desc.textContent = "No candidate scored yet.";
    return;
  }
  let x0 = Math.min(...all.map((p) => p[0])), x1 = Math.max(...all.map((p) => p[0]));
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  let y0 = Math.min(...all.map((p) => p[1])), y1 = Math.max(...all.map((p) => p[1]));
  const pad = Math.max((y1 - y0) * 0.1, 0.005);
  y0 -= pad; y1 += pad;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  cands.forEach((c, j) => {
    const h = c.history || [];
    if (!h.length) return;
    const line = svg("polyline", {
      class: `cline${c.served ? " served" : ""}${c.state === "pruned" ? " pruned" : ""}`,
      points: h.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" "),
      stroke: CAND_COLOURS[j % CAND_COLOURS.length], "data-cid": c.id,
    });
    line.append(svg("title", {}, `${c.id} (${fmtParams(c.params)}): ${metric} ${h[h.length - 1][1].toFixed(4)}`));
    chart.append(line);
  });
  chart.append(svg("text", { x: L - 4, y: T + 8, "text-anchor": "end" }, y1.toFixed(3)),
               svg("text", { x: L - 4, y: H - B, "text-anchor": "end" }, y0.toFixed(3)),
               svg("text", { x: L, y: H - B + 14 }, fmt(x0)),
               svg("text", { x: W - R, y: H - B + 14, "text-anchor": "end" }, fmt(x1)),
               svg("text", { x: (L + W) / 2, y: H - 4, "text-anchor": "middle" }, "events"));
  const leader = cands.find((c) => c.served);
  desc.textContent = `${metric} of ${cands.length} candidates over time` + (leader && leader.score != null
    ? `; the served ${leader.id} is at ${Number(leader.score).toFixed(4)}.` : ".");
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text != null) node.textContent = text;
  return node;
}

function drawChart(points) {
  const { chart, desc, W, H, L, R, T, B } = chartFrame("rmse", 40);
  if (!points.length) {
    desc.textContent = "No batches scored yet.";
    chart.append(svg("text", { x: L + 10, y: H / 2 }, "waiting for the first batches…"));
    return;
  }
  const xs = points.map((p) => p.ratings_seen), ys = points.map((p) => p.prequential_rmse);
  let x0 = Math.min(...xs), x1 = Math.max(...xs);
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  const pad = Math.max((y1 - y0) * 0.1, 0.02);
  y0 = Math.max(0, y0 - pad); y1 += pad;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  const pts = points.map((p) => `${sx(p.ratings_seen).toFixed(1)},${sy(p.prequential_rmse).toFixed(1)}`).join(" ");
  chart.append(svg("polyline", { class: "line", points: pts }));
  const lastP = points[points.length - 1];
  chart.append(svg("circle", { class: "dot", r: 3, cx: sx(lastP.ratings_seen), cy: sy(lastP.prequential_rmse) }));
  chart.append(svg("text", { x: L - 4, y: T + 8, "text-anchor": "end" }, y1.toFixed(2)),
               svg("text", { x: L - 4, y: H - B, "text-anchor": "end" }, y0.toFixed(2)),
               svg("text", { x: L, y: H - B + 14 }, fmt(x0)),
               svg("text", { x: W - R, y: H - B + 14, "text-anchor": "end" }, fmt(x1)),
               svg("text", { x: (L + W) / 2, y: H - 4, "text-anchor": "middle" }, "ratings seen"),
               svg("text", { x: W - R, y: T + 8, "text-anchor": "end" }, `RMSE ${lastP.prequential_rmse.toFixed(3)}`));
  desc.textContent = `RMSE over ${points.length} batches, from ${points[0].prequential_rmse.toFixed(3)} `
    + `to ${lastP.prequential_rmse.toFixed(3)} after ${fmt(lastP.ratings_seen)} ratings.`;
}

// ---- search -------------------------------------------------------------------------------

async function search(append = false) {
  const s = state.search;
  if (!append) s.offset = 0;
  // Only the newest search may render: an older answer arriving late must not replace it.
  const seq = (s.seq = (s.seq || 0) + 1);
  const params = new URLSearchParams({ limit: "20", offset: String(s.offset) });
  if (s.q) params.set("q", s.q);
  if (s.genre) params.set("genre", s.genre);
  $("search-status").textContent = "Searching…";
  const resp = await api(`/api/items?${params}`);
  if (seq !== s.seq) return;
  readProblem(resp);
  if (!resp.ok) {
    $("search-status").textContent = describe(resp, "Search failed.");
    return;
  }
  const items = resp.body.items || [];
  s.total = resp.body.total ?? items.length;
  s.offset += items.length;
  const rows = items.map((m) => movieRow(m));
  if (append) $("results").append(...rows); else $("results").replaceChildren(...rows);
  $("search-status").textContent = s.total === 0 ? "No movie matches." : `Showing ${s.offset} of ${fmt(s.total)} movies.`;
  $("more").hidden = s.offset >= s.total;
}

async function loadGenres() {
  const resp = await api("/api/genres");
  if (!resp.ok) return;
  const select = $("genre");
  for (const g of resp.body.genres) select.append(el("option", { value: g, text: g }));
}

// ---- exploring an existing user -----------------------------------------------------------------

async function exploreUser(user) {
  $("user-status").textContent = `Loading user ${user}…`;
  const [ratings, recs] = await Promise.all([
    api(`/api/users/${encodeURIComponent(user)}/ratings?limit=20`),
    api(`/api/users/${encodeURIComponent(user)}/recommendations?n=10`),
  ]);
  readProblem(ratings);
  if (!ratings.ok && !recs.ok) {
    $("user-status").textContent = describe(ratings, `No data for user ${user}.`);
    $("user-ratings").replaceChildren(); $("user-recs").replaceChildren();
    return;
  }
  const rs = ratings.ok ? ratings.body.ratings : [];
  $("user-status").textContent = `User ${user}: ${rs.length} rating${rs.length === 1 ? "" : "s"} shown.`;
  $("user-ratings").replaceChildren(...rs.map((r) => readonlyRow(r, fmtStars(r.rating))));
  if (recs.ok) {
    setBadge($("user-badge"), recs.body.strategy, recs.body.version);
    $("user-recs").replaceChildren(...recs.body.items.map((m) => readonlyRow(m, servedLabel(m, recs.body.strategy) || "")));
  } else {
    $("user-badge").hidden = true;
    $("user-recs").replaceChildren(el("li", { class: "muted", text: describe(recs, "No recommendations.") }));
  }
}

// ---- start ----------------------------------------------------------------------------------------

async function mergeServerRatings() {
  // What the model has already learned for this visitor (e.g. rated from another tab).
  const resp = await api(`/api/users/${encodeURIComponent(state.visitor)}/ratings?limit=500`);
  if (!resp.ok) return;
  for (const r of resp.body.ratings || []) {
    if (!state.mine.has(r.item)) {
      state.mine.set(r.item, { item: r.item, rating: r.rating, title: r.title, genres: r.genres || [], timestamp: 0, status: "saved" });
    }
  }
  storeMine();
  renderMine();
}

async function start() {
  const cfg = await api("/api/config");
  if (!cfg.ok) { setProblem("config", "The frontend is not reachable."); return; }
  state.visitor = cfg.body.visitor;
  state.tokenRequired = cfg.body.write_token_required;
  state.maxBatch = cfg.body.max_batch || 500;
  if (cfg.body.rating_min != null) state.ratingMin = Number(cfg.body.rating_min);
  if (cfg.body.rating_max != null) state.ratingMax = Number(cfg.body.rating_max);
  $("visitor").textContent = state.visitor.slice(0, 8);
  $("visitor").title = state.visitor;
  $("token-box").hidden = !state.tokenRequired || Boolean(state.token);
  loadMine();
  renderMine();
  drawChart([]);

  let typing = null;
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    // Enter searches now; a search-as-you-type still pending would re-render the results
    // a moment later and take keyboard focus away from the row being rated.
    clearTimeout(typing);
    state.search.q = $("q").value.trim();
    state.search.genre = $("genre").value;
    search();
  });
  $("q").addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => { state.search.q = $("q").value.trim(); state.search.genre = $("genre").value; search(); }, 300);
  });
  $("genre").addEventListener("change", () => { state.search.genre = $("genre").value; search(); });
  $("more").addEventListener("click", () => search(true));
  $("retry").addEventListener("click", () => {
    for (const r of state.mine.values()) if (r.status === "unsaved") r.status = "saving";
    saveRatings();
  });
  $("token-box").addEventListener("submit", (e) => {
    e.preventDefault();
    state.token = $("token").value.trim();
    sessionStorage.setItem("streamrec:token", state.token);
    $("token-box").hidden = true;
    for (const r of state.mine.values()) if (r.status === "unsaved") r.status = "saving";
    saveRatings();
  });
  $("user-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const user = $("user-id").value.trim();
    if (user) exploreUser(user);
  });

  await Promise.all([refreshModel(), refreshPopular(), search(), loadGenres(), mergeServerRatings()]);
  if ([...state.mine.values()].some((r) => r.status !== "saved")) {
    setProblem("write", "Some of your ratings were not accepted yet; use “Retry saving”.");
  }
  await refreshRecs(true);
  setInterval(async () => { await refreshModel(); await refreshRecs(); }, POLL_MS);
  setInterval(refreshPopular, POLL_MS * 8);
}

document.addEventListener("DOMContentLoaded", start);
