// LayerDiff dataset browser (served by `python -m manifests serve`): plain DOM code, no framework,
// no build step. One page per path: / (gallery), /rejections, /stats, /run. Data comes from /api/*.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const LAZY_MARGIN = 300;  // px below the screen that are drawn before they are scrolled to
const BOX_COLOURS = ["#ff5a5a", "#4fc3f7", "#ffd54f", "#81c784", "#ba68c8", "#ff8a65", "#4db6ac", "#f06292"];

// h("div", {class: "x"}, child, "text", ...): a DOM element; text is never parsed as HTML.
function h(tag, attrs, ...children) {
  const el = tag.startsWith("svg:") ? document.createElementNS(SVG_NS, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

async function api(url) {
  const res = await fetch(url);
  const doc = await res.json();
  if (!res.ok) throw new Error(doc.error || `${res.status} ${res.statusText}`);
  return doc;
}

function fmt(v) {
  if (typeof v === "number") {
    if (Number.isInteger(v)) return String(v);
    if (Math.abs(v) < 0.01) return v.toExponential(2);
    return v.toFixed(Math.abs(v) >= 100 ? 1 : 3);
  }
  if (Array.isArray(v)) return v.join(", ");
  return v === null || v === undefined ? "-" : String(v);
}

const shardName = (n) => String(n).padStart(6, "0");
const app = document.getElementById("app");

// Replace the page's content; arrays are flattened and null/false children dropped.
function render(...children) {
  app.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
}

function showError(err) {
  render(h("p", {class: "error", id: "error"}, String(err.message || err)));
}

// ---------------------------------------------------------------------------------------- gallery

function filterForm(info, params) {
  const field = (name) => params.get(name) || "";
  const counts = Object.keys(info.layer_counts);
  const chosenLayers = new Set((params.get("layers") || "").split(",").filter(Boolean));
  const rangeField = [...params.keys()].map((k) => k.slice(4))
    .find((f) => f !== "recon_psnr" && (params.has("min." + f) || params.has("max." + f))) || "";
  const options = (values, selected) => values.map(([v, label]) =>
    h("option", {value: v, selected: v === selected}, label));
  const form = h("form", {class: "filters", id: "filters"},
    h("label", {}, "caption text", h("input", {name: "q", type: "search", value: field("q"), placeholder: "e.g. red star"})),
    h("fieldset", {}, "layers",
      counts.map((k) => h("label", {}, h("input", {type: "checkbox", name: "layer", value: k, checked: chosenLayers.has(k)}),
        `${k} (${info.layer_counts[k]})`))),
    h("label", {}, "shard", h("input", {name: "shard", value: field("shard"), placeholder: "0,3", size: 6})),
    h("label", {}, "stage backend / version", h("select", {name: "stage"},
      options([["", "any"], ...info.stages.map((s) => [s.value, `${s.stage}: ${s.backend} v${s.version} (${s.shards} shards)`])],
        field("stage")))),
    info.fields.includes("recon_psnr") ? [
      h("label", {}, "PSNR ≥", h("input", {name: "min.recon_psnr", type: "number", step: "any", value: field("min.recon_psnr")})),
      h("label", {}, "PSNR ≤", h("input", {name: "max.recon_psnr", type: "number", step: "any", value: field("max.recon_psnr")})),
    ] : null,
    h("label", {}, "field", h("select", {name: "range_field"},
      options([["", "(none)"], ...info.fields.filter((f) => f !== "recon_psnr").map((f) => [f, f])], rangeField))),
    h("label", {}, "min", h("input", {name: "range_min", type: "number", step: "any", value: rangeField ? field("min." + rangeField) : ""})),
    h("label", {}, "max", h("input", {name: "range_max", type: "number", step: "any", value: rangeField ? field("max." + rangeField) : ""})),
    h("label", {}, "sort by", h("select", {name: "sort"},
      options([["position", "shard order"], ["key", "key"], ...info.fields.map((f) => [f, f])], field("sort") || "position"))),
    h("label", {}, "order", h("select", {name: "order"}, options([["asc", "ascending"], ["desc", "descending"]], field("order") || "asc"))),
    h("label", {}, "per page", h("select", {name: "per_page"},
      options([...new Set(["12", "24", "48", "96", field("per_page") || "24"])].sort((a, b) => a - b).map((n) => [n, n]),
        field("per_page") || "24"))),
    h("button", {type: "submit", id: "apply"}, "Apply"),
    h("a", {href: "/"}, "reset"));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const data = new FormData(form);
    const out = new URLSearchParams();
    for (const name of ["q", "shard", "stage", "min.recon_psnr", "max.recon_psnr"]) {
      const v = (data.get(name) || "").trim();
      if (v) out.set(name, v);
    }
    const layers = data.getAll("layer");
    if (layers.length) out.set("layers", layers.join(","));
    const rf = data.get("range_field");
    if (rf) {
      if (data.get("range_min")) out.set("min." + rf, data.get("range_min"));
      if (data.get("range_max")) out.set("max." + rf, data.get("range_max"));
    }
    if (data.get("sort") !== "position") out.set("sort", data.get("sort"));
    if (data.get("order") === "desc") out.set("order", "desc");
    if (data.get("per_page") !== "24") out.set("per_page", data.get("per_page"));
    goGallery("/" + (out.toString() ? "?" + out.toString() : ""));
  });
  return form;
}

function pager(res, params) {
  const link = (page, label) => {
    const p = new URLSearchParams(params);
    p.set("page", page);
    const href = "/?" + p.toString();
    return h("a", {href, class: "page-link", "data-page": page, onclick: (ev) => {
      if (ev.button !== 0 || ev.ctrlKey || ev.metaKey || ev.shiftKey) return;  // new tab: a real link
      ev.preventDefault();
      goGallery(href);
    }}, label);
  };
  return h("span", {class: "pager"},
    res.page > 1 ? link(res.page - 1, "‹ prev") : null,
    h("span", {id: "page-of"}, `page ${res.page} of ${res.pages}`),
    res.page < res.pages ? link(res.page + 1, "next ›") : null);
}

// A card's images come in one request: a strip of image, background and RGBA layers side by side.
function sprite(card) {
  if (!card.spriteLoad) {
    const img = new Image();
    img.src = card.dataset.sprite;
    card.spriteLoad = img.decode().then(() => img);
  }
  return card.spriteLoad;
}

function slice(img, card, part, canvas) {
  const parts = Number(card.dataset.parts);
  const w = img.naturalWidth / parts, hgt = img.naturalHeight;
  if (canvas.width !== w || canvas.height !== hgt) Object.assign(canvas, {width: w, height: hgt});
  canvas.getContext("2d", {willReadFrequently: true}).drawImage(img, part * w, 0, w, hgt, 0, 0, w, hgt);
}

// The live recomposition: background, then every switched-on RGBA layer, back (0) to front, with the
// canvas's source-over blending, i.e. I = a * fg + (1 - a) * I (docs/FORMAT.md).
async function recompose(card) {
  const img = await sprite(card);
  const canvas = card.querySelector("canvas.recomp");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  slice(img, card, 1, canvas);
  const on = [];
  for (const box of card.querySelectorAll("input.layer-toggle")) {
    if (box.checked) {
      const n = Number(box.dataset.layer);
      canvas.getContext("2d").drawImage(img, (2 + n) * canvas.width, 0, canvas.width, canvas.height,
        0, 0, canvas.width, canvas.height);
      on.push(n);
    }
  }
  canvas.dataset.visible = on.join(",");
  canvas.dataset.ready = "1";
}

async function drawCard(card) {
  const img = await sprite(card);
  card.querySelectorAll("canvas.part").forEach((c) => slice(img, card, Number(c.dataset.part), c));
  await recompose(card);
}

function boxesSvg(s) {
  const k = s.height / 160;  // image pixels per screen pixel: labels stay 10 px tall on screen
  const svg = h("svg:svg", {class: "boxes", viewBox: `0 0 ${s.width} ${s.height}`, preserveAspectRatio: "none"});
  s.layers.forEach((layer, n) => {
    if (!Array.isArray(layer.box) || layer.box.length !== 4) return;
    const [x0, y0, x1, y1] = layer.box;
    const colour = BOX_COLOURS[n % BOX_COLOURS.length];
    svg.append(h("svg:rect", {x: x0, y: y0, width: x1 - x0, height: y1 - y0, stroke: colour}),
      h("svg:text", {x: x0 + 2, y: y0 + 11 * k, "font-size": 10 * k, "stroke-width": 2 * k}, `${n}: ${layer.phrase || ""}`));
  });
  return svg;
}

function card(s) {
  const q = s.quality || {};
  const psnr = typeof q.recon_psnr === "number" ? ` · PSNR ${q.recon_psnr.toFixed(2)} dB` : "";
  const size = {width: s.width, height: s.height};
  const el = h("article", {class: "card", "data-key": s.key, "data-shard": s.shard, "data-layers": s.layers.length,
    "data-sprite": s.sprite, "data-parts": s.parts.length},
    h("h3", {}, s.key, h("span", {class: "muted"},
      ` · shard ${shardName(s.shard)} · ${s.layers.length} layer${s.layers.length === 1 ? "" : "s"}${psnr}`)),
    h("p", {class: "caption"}, s.caption),
    h("div", {class: "cells"},
      h("div", {class: "cell"}, h("div", {class: "frame"}, h("canvas", {class: "part image", "data-part": 0, ...size}),
        boxesSvg(s)), h("div", {class: "label"}, "image, boxes")),
      h("div", {class: "cell"}, h("div", {class: "frame checker"}, h("canvas", {class: "recomp", ...size})),
        h("div", {class: "label"}, "recomposition (toggle layers)")),
      h("div", {class: "cell"}, h("div", {class: "frame"}, h("canvas", {class: "part bg", "data-part": 1, ...size})),
        h("div", {class: "label", title: s.background_caption}, "background: " + s.background_caption)),
      s.layers.map((layer, n) => h("div", {class: "cell layer-cell", "data-layer": n},
        h("div", {class: "frame checker"}, h("canvas", {class: "part layer", "data-part": 2 + n, "data-layer": n, ...size})),
        h("label", {class: "label", title: `${layer.caption || ""} (score ${fmt(layer.score)}, area ${fmt(layer.area)})`},
          h("input", {type: "checkbox", class: "layer-toggle", "data-layer": n, checked: true}),
          ` ${n}: ${layer.phrase || ""} — ${layer.caption || ""}`)))),
    h("div", {class: "quality"}, Object.entries(q).map(([k, v]) => `${k} ${fmt(v)}`).join(" · ")));
  el.addEventListener("change", (ev) => {
    if (!ev.target.classList.contains("layer-toggle")) return;
    ev.target.closest(".layer-cell").classList.toggle("off", !ev.target.checked);
    recompose(el).catch(showError);
  });
  return el;
}

// Pages and filters change the gallery in place (no new document): the URL still says where you are.
let galleryInfo = null;

function goGallery(href) {
  app.dataset.ready = "loading";
  history.pushState(null, "", href);
  window.scrollTo(0, 0);
  gallery(galleryInfo).catch(showError);
}

window.addEventListener("popstate", () => {
  if (location.pathname === "/" && galleryInfo) gallery(galleryInfo).catch(showError);
});

async function gallery(infoPromise) {
  galleryInfo = infoPromise;
  app.dataset.ready = "loading";
  const params = new URLSearchParams(location.search);
  const [info, res] = await Promise.all([infoPromise, api("/api/samples" + location.search)]);
  params.delete("page");
  const cards = res.samples.map(card);
  render(filterForm(info, params),
    h("div", {class: "summary-line"},
      h("strong", {id: "match-count", "data-total": res.total}, `${res.total} of ${res.dataset_samples} samples`),
      pager(res, params)),
    h("section", {class: "cards", id: "cards"}, cards));
  // Cards on (or just below) the screen are drawn now; the others when they scroll into view (the
  // server has already started decoding them).
  const near = (c) => c.getBoundingClientRect().top < window.innerHeight + LAZY_MARGIN;
  const lazy = new IntersectionObserver((entries) => {
    for (const e of entries) {
      if (e.isIntersecting) {
        lazy.unobserve(e.target);
        drawCard(e.target).catch(showError);
      }
    }
  }, {rootMargin: `${LAZY_MARGIN}px 0px`});
  cards.filter((c) => !near(c)).forEach((c) => lazy.observe(c));
  await Promise.all(cards.filter(near).map(drawCard));
  app.dataset.ready = "gallery";
}

// ------------------------------------------------------------------------------------- rejections

const MAX_ITEMS_SHOWN = 200;

function rejectionItem(item) {
  const thumb = h("div", {class: "thumb"}, "…");
  const el = h("div", {class: "rejection", "data-shard": item.shard, "data-index": item.index, "data-key": item.key || ""},
    thumb,
    h("div", {},
      h("div", {}, h("strong", {}, item.key || "(no key)"), h("span", {class: "muted"}, ` · shard ${shardName(item.shard)}`)),
      h("div", {class: "muted"}, item.source || ""),
      h("div", {class: "reason"}, item.reason)));
  el.thumbUrl = item.thumb;
  el.thumbBox = thumb;
  return el;
}

// Thumbnails come as JSON (readable or why not), a few at a time, so an unreadable source is a message
// on the page rather than a failed image request.
async function loadThumbs(items) {
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const el = items[next++];
      try {
        const t = await api(el.thumbUrl);
        el.thumbBox.replaceChildren(t.readable ? h("img", {src: "data:image/png;base64," + t.png, alt: "source"})
          : h("span", {title: t.why}, "source not readable"));
        el.dataset.thumb = t.readable ? "image" : "unreadable";
      } catch (err) {
        el.thumbBox.replaceChildren(String(err.message || err));
      }
    }
  };
  await Promise.all([1, 2, 3, 4].map(worker));
}

async function rejections() {
  const res = await api("/api/rejections");
  const items = [];
  const groups = res.groups.map((g) => {
    const shown = g.items.slice(0, MAX_ITEMS_SHOWN).map(rejectionItem);
    items.push(...shown);
    const list = h("div", {class: "items"}, shown);
    const more = g.items.length > MAX_ITEMS_SHOWN ? h("button", {type: "button", onclick: () => {
      const rest = g.items.slice(MAX_ITEMS_SHOWN).map(rejectionItem);
      list.append(...rest);
      more.remove();
      loadThumbs(rest);
    }}, `show all ${g.items.length}`) : null;
    return h("details", {class: "group", open: true, "data-stage": g.stage, "data-count": g.count},
      h("summary", {}, `${g.stage} — ${g.reason} (${g.count})`), list, more);
  });
  render(h("h2", {id: "rejection-total", "data-total": res.total},
    `${res.total} rejection${res.total === 1 ? "" : "s"} in ${res.groups.length} group${res.groups.length === 1 ? "" : "s"}`),
  res.total ? null : h("p", {class: "muted"}, "Every source item became a sample."), groups);
  await loadThumbs(items);
  app.dataset.ready = "rejections";
}

// ------------------------------------------------------------------------------------------ charts

function barChart(title, labels, values, {width = 360, horizontal = false, unit = ""} = {}) {
  const n = values.length;
  const max = Math.max(1e-9, ...values);
  if (horizontal) {
    const rowH = 16, labelW = 200, height = n * rowH + 4;
    const svg = h("svg:svg", {width, height, viewBox: `0 0 ${width} ${height}`});
    values.forEach((v, i) => {
      const w = (width - labelW - 40) * v / max;
      svg.append(h("svg:text", {x: 0, y: i * rowH + 12}, labels[i].length > 34 ? labels[i].slice(0, 33) + "…" : labels[i]),
        h("svg:rect", {x: labelW, y: i * rowH + 3, width: Math.max(1, w), height: rowH - 5, fill: "#d9822b"}),
        h("svg:text", {x: labelW + w + 4, y: i * rowH + 12}, fmt(v) + unit));
    });
    return h("div", {class: "chart"}, h("h4", {}, title), svg);
  }
  const height = 140, barW = Math.max(2, Math.min(40, (width - 20) / Math.max(1, n) - 2));
  const svg = h("svg:svg", {width, height: height + 30, viewBox: `0 0 ${width} ${height + 30}`});
  values.forEach((v, i) => {
    const bh = (height - 14) * v / max, x = 10 + i * (barW + 2);
    svg.append(h("svg:rect", {x, y: height - bh, width: barW, height: Math.max(0, bh), fill: "#2f6fd6"},
      h("svg:title", {}, `${labels[i]}: ${fmt(v)}${unit}`)));
    if (n <= 24) {
      svg.append(h("svg:text", {x: x + barW / 2, y: height + 12, "text-anchor": "middle"}, labels[i]),
        h("svg:text", {x: x + barW / 2, y: height - bh - 3, "text-anchor": "middle"}, fmt(v)));
    }
  });
  return h("div", {class: "chart"}, h("h4", {}, title), svg);
}

function lineChart(title, xs, ys, {width = 420, height = 180} = {}) {
  const pts = xs.map((x, i) => [x, ys[i]]).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
  const svg = h("svg:svg", {width, height: height + 20, viewBox: `0 0 ${width} ${height + 20}`});
  if (pts.length) {
    const [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
    const [y0, y1] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
    const sx = (x) => 40 + (width - 50) * (x - x0) / Math.max(1e-9, x1 - x0);
    const sy = (y) => 8 + (height - 16) * (1 - (y - y0) / Math.max(1e-9, y1 - y0));
    svg.append(h("svg:polyline", {fill: "none", stroke: "#2f6fd6", "stroke-width": 1.5,
      points: pts.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" ")}),
    h("svg:text", {x: 0, y: 12}, fmt(y1)), h("svg:text", {x: 0, y: height - 4}, fmt(y0)),
    h("svg:text", {x: 40, y: height + 14}, `step ${fmt(x0)}`),
    h("svg:text", {x: width - 10, y: height + 14, "text-anchor": "end"}, `step ${fmt(x1)}`));
  }
  return h("div", {class: "chart"}, h("h4", {}, title), svg);
}

// ------------------------------------------------------------------------------------------- stats

async function stats() {
  const s = await api("/api/stats");
  const t = s.totals;
  const reasons = s.rejections.slice(0, 15);
  const mib = (b) => `${(b / 1048576).toFixed(1)} MiB`;
  render(
    h("div", {class: "totals", id: "totals"},
      [["shards", t.shards], ["samples", t.samples], ["rejected", t.rejected],
        ["accepted", t.acceptance === null ? "-" : `${(100 * t.acceptance).toFixed(1)}%`],
        ["mean layers", fmt(t.mean_layers)], ["size", mib(t.bytes)], ["seconds", fmt(t.seconds)]]
        .map(([k, v]) => h("div", {}, h("b", {}, v), k))),
    h("div", {class: "charts"},
      barChart("samples by layer count", Object.keys(s.layers), Object.values(s.layers)),
      barChart("rejections by reason", reasons.map((r) => `${r.stage}: ${r.reason}`), reasons.map((r) => r.count),
        {horizontal: true, width: 520}),
      barChart("seconds per shard", s.shards.map((r) => shardName(r.shard)),
        s.shards.map((r) => (typeof r.seconds === "number" ? r.seconds : 0)), {unit: " s"}),
      barChart("samples per shard", s.shards.map((r) => shardName(r.shard)), s.shards.map((r) => r.samples))),
    h("h3", {}, "stages"),
    h("table", {}, h("tr", {}, ["stage", "backend", "model", "checkpoint", "version", "shards"].map((c) => h("th", {}, c))),
      Object.entries(s.stages).flatMap(([stage, ids]) => ids.map((i) =>
        h("tr", {}, [stage, i.backend, i.model, i.checkpoint, i.version, i.shards].map((c) => h("td", {}, fmt(c))))))),
    h("h3", {}, "shards"),
    h("table", {id: "shard-table"},
      h("tr", {}, ["shard", "samples", "rejected", "size", "seconds", "layers", "created"].map((c) => h("th", {}, c))),
      s.shards.slice(0, 1000).map((r) => h("tr", {}, [shardName(r.shard), r.samples, r.rejected, mib(r.bytes),
        fmt(r.seconds), Object.entries(r.layers).map(([k, v]) => `${k}:${v}`).join(" "), fmt(r.created)]
        .map((c) => h("td", {}, c))))),
    s.problems.length ? h("ul", {class: "error"}, s.problems.map((p) => h("li", {}, p))) : null);
  app.dataset.ready = "stats";
}

// --------------------------------------------------------------------------------------------- run

async function run() {
  const r = await api("/api/run");
  const steps = r.rows.map((row) => row.step);
  const lossCols = r.columns.filter((c) => c.includes("loss"));
  const others = r.columns.filter((c) => !c.includes("loss") && !["elapsed_s", "clock_s"].includes(c));
  const grids = r.grids.filter((g) => g.step !== null);
  const reference = r.grids.find((g) => g.step === null);
  const img = h("img", {id: "grid-image", alt: "sample grid"});
  const label = h("div", {id: "grid-label"});
  const slider = h("input", {type: "range", min: 0, max: Math.max(0, grids.length - 1), value: Math.max(0, grids.length - 1)});
  const show = () => {
    const g = grids[Number(slider.value)];
    if (!g) return;
    img.src = g.url;
    label.textContent = `samples at step ${g.step} (${Number(slider.value) + 1} of ${grids.length})`;
  };
  slider.addEventListener("input", show);
  show();
  render(h("h2", {}, `run ${r.name}`), h("p", {class: "muted"}, r.path),
    h("div", {class: "charts", id: "loss-charts"},
      [...lossCols, ...others].map((c) => lineChart(c, steps, r.rows.map((row) => row[c])))),
    h("h3", {}, "sample grids by step"),
    grids.length ? h("div", {class: "grid-view"}, slider, label, img) : h("p", {class: "muted"}, "no sample grids yet"),
    reference ? h("div", {class: "grid-view"}, h("h3", {}, "reference (training data)"),
      h("img", {src: reference.url, alt: "reference grid"})) : null);
  app.dataset.ready = "run";
}

// -------------------------------------------------------------------------------------------- main

async function main() {
  const views = {"/": ["gallery", gallery], "/rejections": ["rejections", rejections], "/stats": ["stats", stats],
    "/run": ["run", run]};
  const [name, view] = views[location.pathname] || views["/"];
  document.querySelectorAll("header nav a").forEach((a) => a.classList.toggle("active", a.dataset.view === name));
  try {
    const infoPromise = api("/api/info");
    const viewDone = view(infoPromise);  // the view's own requests go out alongside /api/info
    const info = await infoPromise;
    document.getElementById("dataset-name").textContent = `${info.name} · ${info.samples} samples`;
    document.getElementById("nav-run").hidden = !info.run;
    await viewDone;
  } catch (err) {
    showError(err);
    app.dataset.ready = "error";
  }
}

main();
