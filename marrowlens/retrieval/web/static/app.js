// The similar-cell page: upload or drop an image (or click a result or a map point) -> POST /api/search -> grid.
// Filters (GET /api/facets) go with every search and re-run the last one when changed; a failed search
// clears the previous results. Plain DOM code, no framework, nothing from the network; labels go in via
// textContent only. map.js draws the embedding map and calls searchCellId().
"use strict";

const $ = (id) => document.getElementById(id);
const drop = $("drop"), fileInput = $("file"), kInput = $("k"), statusLine = $("status");
let queryUrl = null;
let lastSearch = null; // { makeForm, queryImage, queryCaption }: what a filter change searches again
let searchSeq = 0; // answers to searches overtaken by a newer one are dropped

function setStatus(text, isError = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", isError);
}

function filterControls() {
  return [...document.querySelectorAll("#filters select[data-column], #filters input[data-column]")];
}

function activeFilters() {
  return filterControls()
    .filter((el) => el.value.trim())
    .map((el) => `${el.dataset.column}=${el.value.trim()}`);
}

async function search(makeForm, queryImage, queryCaption) {
  lastSearch = { makeForm, queryImage, queryCaption };
  const seq = ++searchSeq;
  const form = makeForm();
  form.append("k", kInput.value || "10");
  const filters = activeFilters();
  for (const filter of filters) form.append("filter", filter);
  setStatus("searching…");
  let response;
  try {
    response = await fetch("/api/search", { method: "POST", body: form });
  } catch (err) {
    if (seq !== searchSeq) return;
    clearResults();
    setStatus("the server cannot be reached", true);
    return;
  }
  if (seq !== searchSeq) return;
  if (!response.ok) {
    const detail = await errorDetail(response);
    if (seq !== searchSeq) return;
    clearResults(); // the previous query's neighbours must not pass for this one's
    setStatus(`error: ${detail}`, true);
    return;
  }
  const result = await response.json();
  if (seq !== searchSeq) return;
  render(result, queryImage, queryCaption);
  setStatus(
    `${result.neighbours.length} neighbours in ${result.elapsed_ms.toFixed(0)} ms ` +
      `(${result.index_kind} index, ${result.metric})` +
      (filters.length ? `; only cells with ${filters.join(" and ")}` : ""),
  );
}

function clearResults() {
  $("result").hidden = true;
  $("grid").replaceChildren();
  $("vote").replaceChildren();
  $("query-image").removeAttribute("src");
  $("query-caption").textContent = "";
  $("self-note").hidden = true;
  document.dispatchEvent(new CustomEvent("marrowlens:result", { detail: null }));
}

async function errorDetail(response) {
  if (response.status === 413) return "the image is larger than the upload limit";
  try {
    const body = await response.json();
    return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (_) {
    return response.statusText;
  }
}

function searchFile(file) {
  if (!file) return;
  if (queryUrl) URL.revokeObjectURL(queryUrl);
  queryUrl = URL.createObjectURL(file);
  const url = queryUrl;
  search(
    () => {
      const form = new FormData();
      form.append("image", file, file.name);
      return form;
    },
    url,
    file.name,
  );
}

function searchCell(cell) {
  search(
    () => {
      const form = new FormData();
      form.append("cell_id", cell.cell_id);
      return form;
    },
    cell.thumbnail,
    describe(cell).join(" · "),
  );
}

// A link to /?cell=ID (the patient pages' cells) searches from that indexed cell on load.
async function searchCellId(cellId) {
  let response;
  try {
    response = await fetch(`/api/cells/${encodeURIComponent(cellId)}`);
  } catch (err) {
    clearResults();
    setStatus("the server cannot be reached", true);
    return;
  }
  if (!response.ok) {
    clearResults();
    setStatus(`error: ${await errorDetail(response)}`, true);
    return;
  }
  searchCell(await response.json());
}

function blastLabel(value) {
  return value === true ? "blast" : value === false ? "non-blast" : null;
}

function describe(cell) {
  return [
    cell.patient_id ? `patient ${cell.patient_id}` : null,
    cell.cell_type,
    blastLabel(cell.is_blast),
    cell.mutation,
  ].filter((x) => x);
}

function line(text, className) {
  const p = document.createElement("p");
  p.textContent = text || "–";
  if (className) p.className = className;
  p.title = text || "";
  return p;
}

function card(cell) {
  const item = document.createElement("li");
  item.className = "card";
  item.tabIndex = 0;
  item.dataset.cellId = cell.cell_id;
  const img = document.createElement("img");
  img.src = cell.thumbnail;
  img.alt = `cell ${cell.cell_id.slice(0, 12)}`;
  const head = document.createElement("div");
  head.className = "rank";
  const rank = document.createElement("span");
  rank.textContent = `#${cell.rank}`;
  const sim = document.createElement("span");
  sim.className = "sim";
  sim.textContent = cell.similarity !== null ? `sim ${cell.similarity.toFixed(3)}` : `dist ${cell.distance.toFixed(3)}`;
  head.append(rank, sim);
  const scale = line(percentileText(cell), "pct");
  scale.title = percentileTitle(cell);
  const type = [cell.cell_type, blastLabel(cell.is_blast)].filter((x) => x).join(" · ") || "cell type unknown";
  item.append(
    img, head, scale,
    line(cell.patient_id ? `patient ${cell.patient_id}` : "patient unknown"),
    line(type, cell.is_blast ? "blast" : null),
    line(cell.mutation || "mutation unknown"),
  );
  item.addEventListener("click", () => searchCell(cell));
  item.addEventListener("keydown", (e) => { if (e.key === "Enter") searchCell(cell); });
  return item;
}

function percentileText(cell) {
  return cell.percentile === null || cell.percentile === undefined ? "" : `above ${cell.percentile}% of pairs`;
}

function percentileTitle(cell) {
  if (cell.percentile === null || cell.percentile === undefined) return "";
  const value =
    cell.similarity !== null ? `similarity ${cell.similarity.toFixed(2)}` : `distance ${cell.distance.toFixed(3)}`;
  return `${value}: more similar than ${cell.percentile}% of random pairs of cells in this index`;
}

const VOTE_NAMES = { cell_type: "cell type", is_blast: "blast", mutation: "mutation" };

function renderVote(vote, k) {
  const list = $("vote");
  list.replaceChildren();
  for (const [column, entries] of Object.entries(vote)) {
    const dt = document.createElement("dt");
    dt.textContent = VOTE_NAMES[column] || column;
    const dd = document.createElement("dd");
    for (const { label, count } of entries) {
      const share = document.createElement("span");
      share.className = "share";
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.width = `${Math.max(4, (60 * count) / k)}px`;
      share.append(bar, document.createTextNode(`${label} ${count}/${k}`));
      dd.append(share);
    }
    list.append(dt, dd);
  }
  if (!list.children.length) list.append(document.createTextNode("the neighbours carry no labels"));
}

function render(result, queryImage, queryCaption) {
  $("result").hidden = false;
  $("query-image").src = queryImage;
  $("query-caption").textContent = queryCaption;
  renderVote(result.vote, result.neighbours.length);
  const itself = result.query.cell, note = $("self-note");
  note.hidden = !itself;
  note.textContent = itself
    ? `${result.query.kind === "upload" ? "This image is" : "The query is"} ` +
      `indexed cell ${itself.cell_id.slice(0, 12)} ` +
      `(${describe(itself).join(" · ")}): it is left out of its own neighbours and vote.`
    : "";
  $("grid").replaceChildren(...result.neighbours.map(card));
  document.dispatchEvent(new CustomEvent("marrowlens:result", { detail: result }));
}

// Filter controls: one select per column with values (an input with suggestions where there are too many).
async function loadFacets() {
  let facets;
  try {
    const response = await fetch("/api/facets");
    if (!response.ok) return;
    facets = await response.json();
  } catch (_) {
    return;
  }
  for (const [column, values] of Object.entries(facets.values)) {
    const label = document.querySelector(`#filters label[data-column="${column}"]`);
    if (!label || !values.length) continue;
    let control = $(`filter-${column}`);
    if (facets.truncated.includes(column)) {
      const input = document.createElement("input");
      input.id = control.id;
      input.dataset.column = column;
      input.placeholder = "any";
      input.setAttribute("list", `${control.id}-values`);
      const list = document.createElement("datalist");
      list.id = `${control.id}-values`;
      control.replaceWith(input, list);
      control = list;
    }
    for (const value of values) {
      const option = document.createElement("option");
      option.value = value;
      option.textContent = value;
      control.append(option);
    }
    label.hidden = false;
  }
  for (const control of filterControls()) control.addEventListener("change", searchAgain);
}

function searchAgain() {
  if (lastSearch) search(lastSearch.makeForm, lastSearch.queryImage, lastSearch.queryCaption);
}

$("clear-filters").addEventListener("click", () => {
  filterControls().forEach((el) => (el.value = ""));
  searchAgain();
});
loadFacets();

fileInput.addEventListener("change", () => searchFile(fileInput.files[0]));
["dragenter", "dragover"].forEach((name) =>
  drop.addEventListener(name, (e) => {
    e.preventDefault();
    drop.classList.add("over");
  }),
);
["dragleave", "drop"].forEach((name) =>
  drop.addEventListener(name, (e) => {
    e.preventDefault();
    drop.classList.remove("over");
  }),
);
drop.addEventListener("drop", (e) => searchFile(e.dataTransfer.files[0]));
const startCell = new URLSearchParams(window.location.search).get("cell");
if (startCell) searchCellId(startCell);
