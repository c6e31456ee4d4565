// The similar-cell page: upload or drop an image (or click a result) -> POST /api/search -> grid.
// Plain DOM code, no framework and nothing from the network; labels go in via textContent only.
"use strict";

const $ = (id) => document.getElementById(id);
const drop = $("drop"), fileInput = $("file"), kInput = $("k"), statusLine = $("status");
let queryUrl = null;

function setStatus(text, isError = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", isError);
}

async function search(form, queryImage, queryCaption) {
  form.append("k", kInput.value || "10");
  setStatus("searching…");
  let response;
  try {
    response = await fetch("/api/search", { method: "POST", body: form });
  } catch (err) {
    setStatus("the server cannot be reached", true);
    return;
  }
  if (!response.ok) {
    setStatus(`error: ${await errorDetail(response)}`, true);
    return;
  }
  const result = await response.json();
  render(result, queryImage, queryCaption);
  setStatus(
    `${result.neighbours.length} neighbours in ${result.elapsed_ms.toFixed(0)} ms ` +
      `(${result.index_kind} index, ${result.metric})`,
  );
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
  const form = new FormData();
  form.append("image", file, file.name);
  search(form, queryUrl, file.name);
}

function searchCell(cell) {
  const form = new FormData();
  form.append("cell_id", cell.cell_id);
  search(form, cell.thumbnail, describe(cell).join(" · "));
}

// A link to /?cell=ID (the patient pages' cells) searches from that indexed cell on load.
async function searchCellId(cellId) {
  let response;
  try {
    response = await fetch(`/api/cells/${encodeURIComponent(cellId)}`);
  } catch (err) {
    setStatus("the server cannot be reached", true);
    return;
  }
  if (!response.ok) {
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
  const type = [cell.cell_type, blastLabel(cell.is_blast)].filter((x) => x).join(" · ") || "cell type unknown";
  item.append(
    img, head,
    line(cell.patient_id ? `patient ${cell.patient_id}` : "patient unknown"),
    line(type, cell.is_blast ? "blast" : null),
    line(cell.mutation || "mutation unknown"),
  );
  item.addEventListener("click", () => searchCell(cell));
  item.addEventListener("keydown", (e) => { if (e.key === "Enter") searchCell(cell); });
  return item;
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
}

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
