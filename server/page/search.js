// The search page: plain browser JavaScript against the public HTTP API, nothing fetched from
// elsewhere. Every text from the index is set with textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const query = { image: null };  // the query image as a data: URL, or null
let thumbnails = [];            // blob: URLs of the shown results, released on the next search

function apiKey() {
  return $("api-key").value.trim();
}

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (apiKey()) headers["Authorization"] = "Bearer " + apiKey();
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  let res;
  try {
    res = await fetch(path, { ...options, headers });
  } catch (e) {
    throw new ApiError(0, "unreachable", "the server could not be reached (" + e.message + ")");
  }
  if (!res.ok) {
    let code = "http_" + res.status, message = res.statusText || "request failed";
    try {
      const body = await res.json();
      if (body && body.error) ({ code, message } = body.error);
    } catch (_) { /* not JSON: keep the status line */ }
    throw new ApiError(res.status, code, message);
  }
  return res;
}

function showError(e) {
  const box = $("error");
  box.textContent = e instanceof ApiError && e.status ? `${e.status} ${e.code}: ${e.message}` : e.message;
  box.hidden = false;
  $("status").textContent = "";
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

async function loadInfo() {
  try {
    const info = await (await api("/v1/index")).json();
    const enc = info.query_encoder || {};
    const versions = (info.encoders || []).length;
    $("index-info").textContent = `${info.documents} documents · query encoder ${enc.spec || "?"} · ` +
      `encoder version ${info.active_version} active (${versions} registered) · ${info.segments.length} segment(s)` +
      (info.reranker ? ` · re-ranking the top ${info.reranker.depth} (cosine + ${info.reranker.weight} × P(yes))` : "");
  } catch (e) {
    $("index-info").textContent = e.status === 401 || e.status === 403
      ? "this server needs an API key: enter it on the right" : "index information unavailable";
    if (e.status !== 401) showError(e);
  }
}

// `year=2020, draft=false, name="2020"`: numbers and booleans typed, quotes force a string.
function parseFilter(text) {
  const out = {};
  const parts = text.match(/(?:[^,"]+|"[^"]*")+/g) || [];
  for (const raw of parts) {
    const part = raw.trim();
    if (!part) continue;
    const eq = part.indexOf("=");
    if (eq < 1) throw new Error(`metadata filter: "${part}" is not key=value (e.g. year=2020, name="x")`);
    const key = part.slice(0, eq).trim();
    const value = part.slice(eq + 1).trim();
    if (/^".*"$/.test(value)) out[key] = value.slice(1, -1);
    else if (value === "true" || value === "false") out[key] = value === "true";
    else if (value !== "" && !isNaN(Number(value))) out[key] = Number(value);
    else out[key] = value;
  }
  return Object.keys(out).length ? out : null;
}

function requestBody() {
  const body = { k: Number($("k").value || 12) };
  const text = $("text").value.trim();
  if (text) body.text = text;
  if (query.image) body.image = query.image;
  const instruction = $("instruction").value.trim();
  if (instruction) body.instruction = instruction;
  if ($("modality").value) body.modality = $("modality").value;
  const filter = parseFilter($("filter").value);
  if (filter) body.filter = filter;
  return body;
}

async function search(event) {
  if (event) event.preventDefault();
  clearError();
  let body;
  try {
    body = requestBody();
  } catch (e) {
    render([]);  // the results shown answer another query: never leave them under this one's error
    showError(e);
    return;
  }
  $("status").textContent = "searching…";
  $("search").disabled = true;
  try {
    const data = await (await api("/v1/search", { method: "POST", body: JSON.stringify(body) })).json();
    render(data.results);
    $("status").textContent = `${data.results.length} results in ${data.took_ms} ms · encoder version ${data.encoder_version}`;
  } catch (e) {
    render([]);
    showError(e);
  } finally {
    $("search").disabled = false;
  }
}

function scoreLine(hit) {
  let line = `score ${hit.score.toFixed(4)}`;
  if (hit.rerank) line += ` (re-ranked: cosine ${hit.rerank.cosine.toFixed(4)}, P(yes) ${hit.rerank.p_yes.toFixed(3)})`;
  else if (hit.cosine !== null && hit.cosine !== undefined) line += ` (cosine ${hit.cosine.toFixed(4)})`;
  return line;
}

function element(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text;
  return el;
}

async function loadThumbnail(img, url) {
  try {
    const blob = await (await api(url + "?size=256")).blob();
    const src = URL.createObjectURL(blob);
    thumbnails.push(src);
    img.src = src;
  } catch (e) {
    img.alt = `thumbnail unavailable: ${e.message}`;
  }
}

function render(hits) {
  thumbnails.forEach((u) => URL.revokeObjectURL(u));
  thumbnails = [];
  const grid = $("results");
  grid.replaceChildren();
  hits.forEach((hit, rank) => {
    const card = element("article", "hit");
    card.dataset.id = hit.id;
    card.setAttribute("aria-label", `result ${rank + 1}: ${hit.id}`);
    if (hit.image) {
      const img = element("img", "thumb");
      img.alt = hit.text || hit.id;
      img.dataset.src = hit.image;
      card.append(img);
      loadThumbnail(img, hit.image);
    }
    card.append(element("div", "id", `${rank + 1}. ${hit.id} · ${hit.modality}`));
    card.append(element("div", "score", scoreLine(hit)));
    if (hit.text) card.append(element("p", "text", hit.text));
    if (hit.metadata && Object.keys(hit.metadata).length) {
      const meta = element("details");
      meta.append(element("summary", "", "metadata"), element("pre", "", JSON.stringify(hit.metadata, null, 1)));
      card.append(meta);
    }
    const like = element("button", "secondary more", "More like this");
    like.type = "button";
    like.addEventListener("click", () => moreLikeThis(hit.id));
    card.append(like);
    grid.append(card);
  });
}

function readAsDataURL(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error("the image could not be read"));
    reader.readAsDataURL(blob);
  });
}

function setImage(dataURL) {
  query.image = dataURL;
  $("image-preview").src = dataURL;
  $("image-preview").hidden = false;
  $("clear-image").hidden = false;
}

function clearImage() {
  query.image = null;
  $("image").value = "";
  $("image-preview").hidden = true;
  $("image-preview").removeAttribute("src");
  $("clear-image").hidden = true;
}

async function useFile(file) {
  if (!file) return;
  clearError();
  setImage(await readAsDataURL(file));
  await search();
}

// Query by a document's own content: its stored image and its text.
async function moreLikeThis(id) {
  clearError();
  try {
    const doc = await (await api("/v1/documents/" + encodeURIComponent(id))).json();
    $("text").value = doc.text || "";
    if (doc.image) setImage(await readAsDataURL(await (await api(doc.image)).blob()));
    else clearImage();
    await search();
  } catch (e) {
    showError(e);
  }
}

function init() {
  const key = sessionStorage.getItem("umr-api-key");
  if (key) $("api-key").value = key;
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("umr-api-key", apiKey());
    clearError();
    loadInfo();
  });
  $("query").addEventListener("submit", search);
  $("image").addEventListener("change", () => useFile($("image").files[0]));
  $("clear-image").addEventListener("click", clearImage);
  const drop = $("drop");
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("image").click(); }
  });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    useFile([...e.dataTransfer.files].find((f) => f.type.startsWith("image/")) || e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData || {}).items || []].find((i) => i.type.startsWith("image/"));
    if (item) { e.preventDefault(); useFile(item.getAsFile()); }
  });
  document.addEventListener("keydown", (e) => {
    const typing = ["INPUT", "TEXTAREA", "SELECT"].includes(document.activeElement.tagName);
    if (e.key === "/" && !typing) { e.preventDefault(); $("text").focus(); }
    if (e.key === "Escape" && query.image) clearImage();
  });
  loadInfo();
}

init();
