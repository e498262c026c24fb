// The explain service's page: no framework, nothing from a CDN; it talks to the same app's API.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { bytes: null, b64: null, photo: null, heat: null, model: null, tasks: {}, box: null, drag: null };
const isDetector = () => state.tasks[state.model] === "detect";

function showError(text) {
  $("error").textContent = text || "";
  $("error").hidden = !text;
}

function status(text) { $("status").textContent = text || ""; }

async function api(path, body) {
  const r = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  let data = null;
  try { data = await r.json(); } catch (e) { data = { error: `HTTP ${r.status}` }; }
  if (!r.ok) throw new Error(data.error || `HTTP ${r.status}`);
  return data;
}

function toBase64(buffer) {
  const bytes = new Uint8Array(buffer);
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser cannot show this image"));
    img.src = src;
  });
}

function draw() {
  const c = $("view"), ctx = c.getContext("2d");
  if (!state.photo) { ctx.clearRect(0, 0, c.width, c.height); return; }
  const scale = Math.min(1, 640 / Math.max(state.photo.width, state.photo.height));
  c.width = Math.round(state.photo.width * scale);
  c.height = Math.round(state.photo.height * scale);
  ctx.globalAlpha = 1;
  ctx.drawImage(state.photo, 0, 0, c.width, c.height);
  if (state.heat) {
    ctx.globalAlpha = $("opacity").value / 100;
    ctx.drawImage(state.heat, 0, 0, c.width, c.height);
    ctx.globalAlpha = 1;
  }
  const b = state.drag || state.box;  // a box being drawn / drawn (photo pixels)
  if (b && isDetector()) {
    const s = c.width / state.photo.width;
    ctx.strokeStyle = "#fff"; ctx.lineWidth = 2; ctx.setLineDash([6, 4]);
    ctx.strokeRect(b[0] * s, b[1] * s, (b[2] - b[0]) * s, (b[3] - b[1]) * s);
    ctx.setLineDash([]);
  }
}

// detectors: drag on the photo to draw a box (photo pixels), then type its class
function photoPoint(e) {
  const c = $("view"), r = c.getBoundingClientRect();
  const x = (e.clientX - r.left) / r.width * state.photo.width, y = (e.clientY - r.top) / r.height * state.photo.height;
  return [Math.min(Math.max(x, 0), state.photo.width), Math.min(Math.max(y, 0), state.photo.height)];
}
$("view").addEventListener("mousedown", (e) => {
  if (!isDetector() || !state.photo) return;
  const [x, y] = photoPoint(e);
  state.dragStart = [x, y];
  state.drag = [x, y, x, y];
});
$("view").addEventListener("mousemove", (e) => {
  if (!state.dragStart) return;
  const [x, y] = photoPoint(e), [x0, y0] = state.dragStart;
  state.drag = [Math.min(x0, x), Math.min(y0, y), Math.max(x0, x), Math.max(y0, y)];
  draw();
});
window.addEventListener("mouseup", () => {
  if (!state.dragStart) return;
  const b = state.drag;
  state.dragStart = null; state.drag = null;
  if (b && b[2] - b[0] >= 2 && b[3] - b[1] >= 2) {
    state.box = b.map((v) => Math.round(v));
    status(`box [${state.box.join(", ")}]: type its class and press Enter`);
    $("label").focus();
  }
  draw();
});

async function loadModels() {
  const data = await api("/ui/models");
  $("model").innerHTML = "";
  for (const m of data.models) {
    state.tasks[m.name] = m.task;
    const kind = m.task === "detect" ? "detector, " : "";
    $("model").add(new Option(`${m.name} (${kind}${m.labels} classes, ${m.provider})`, m.name));
  }
  $("preset").innerHTML = "";
  for (const p of data.presets) $("preset").add(new Option(p, p));
  $("preset").value = data.models.length ? data.models[0].preset : "paper";
  $("fine").checked = data.models.length > 0 && (data.models[0].layers || []).length > 1;
  await modelChanged();
}

async function modelChanged() {
  state.model = $("model").value;
  state.box = null;
  $("detect-hint").hidden = !isDetector();
  $("target-label").textContent = isDetector() ? "Detection" : "Class";
  $("probs-title").textContent = isDetector() ? "Detections" : "Probabilities";
  $("fine-label").hidden = isDetector();  // a detector is explained from one level
  $("qrise-label").hidden = isDetector();  // and with Score-CAM
  $("fast-text").textContent = isDetector() ? "Fast mode (16 masks, kernel fill)" : "Fast mode (64 channels, kernel fill)";
  const data = await api(`/ui/models/${encodeURIComponent(state.model)}/labels`);
  const list = $("labels");
  list.innerHTML = "";
  data.labels.forEach((label, i) => { const o = document.createElement("option"); o.value = label; o.label = `${i}`; list.appendChild(o); });
  if (state.b64) await predict();
}

async function pick(file) {
  showError("");
  if (!file) return;
  if (!file.type.startsWith("image/")) { showError(`${file.name} is not an image`); return; }
  state.bytes = await file.arrayBuffer();
  state.b64 = toBase64(state.bytes);
  state.heat = null;
  state.box = null;
  $("shown").hidden = true;
  try {
    state.photo = await loadImage(URL.createObjectURL(file));
  } catch (e) { state.photo = null; }
  draw();
  await predict();
  await explain();
}

async function predict() {
  status(isDetector() ? "detecting..." : "classifying...");
  const data = await api(`/v1/models/${encodeURIComponent(state.model)}:predict`, { instances: [{ image: { b64: state.b64 } }] });
  const preds = data.predictions[0];
  if (isDetector()) { showDetections(preds); status(""); return; }
  const sel = $("target");
  sel.innerHTML = "";
  for (const p of preds) sel.add(new Option(`${p.label} — ${(100 * p.probability).toFixed(1)}%`, String(p.class_index)));
  sel.disabled = false;
  $("go").disabled = false;
  renderProbs(preds, preds[0].class_index);
  status("");
}

function boxText(b) { return `[${b.map((v) => Math.round(v)).join(" ")}]`; }

function showDetections(dets) {
  const sel = $("target");
  sel.innerHTML = "";
  for (const d of dets) sel.add(new Option(`${d.detection}: ${d.label} ${(100 * d.score).toFixed(1)}% ${boxText(d.box)}`, String(d.detection)));
  if (!dets.length) sel.add(new Option("(no detections: drag a box and type its class)", ""));
  sel.disabled = !dets.length;
  $("go").disabled = false;
  const ol = $("probs");
  ol.innerHTML = "";
  for (const d of dets) {
    const li = document.createElement("li");
    li.dataset.detection = d.detection;
    li.textContent = `${d.label} (${d.class_index}): ${(100 * d.score).toFixed(2)}% ${boxText(d.box)}`;
    ol.appendChild(li);
  }
}

function renderProbs(preds, chosen) {
  const ol = $("probs");
  ol.innerHTML = "";
  for (const p of preds) {
    const li = document.createElement("li");
    li.dataset.classIndex = p.class_index;
    li.textContent = `${p.label} (${p.class_index}): ${(100 * p.probability).toFixed(2)}%`;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${Math.max(1, Math.round(120 * p.probability))}px`;
    li.appendChild(bar);
    if (p.class_index === chosen) li.classList.add("chosen");
    ol.appendChild(li);
  }
}

async function explainBox() {
  const typed = $("label").value.trim();
  const inst = { image: { b64: state.b64 } };
  if (state.box) {
    if (!typed) { showError("type the class of the box you drew (a label or a class index)"); return; }
    inst.box = state.box;
    inst.targets = [/^\d+$/.test(typed) ? Number(typed) : typed];
  } else if ($("target").value !== "") {
    inst.detection = Number($("target").value);
  } else {
    showError("the detector found nothing: drag a box on the photo and type its class"); return;
  }
  const params = { preset: $("preset").value, overlay: true, alpha: 1.0 };
  if ($("fast").checked) { params.max_channels = 16; params.fill = "kernel"; }
  $("go").disabled = true;
  status("explaining...");
  const t0 = performance.now();
  try {
    const data = await api(`/v1/models/${encodeURIComponent(state.model)}:explain`, { instances: [inst], parameters: params });
    const r = data.explanations[0].results[0];
    state.heat = await loadImage(`data:image/png;base64,${r.overlay.b64}`);
    draw();
    $("shown-class").textContent = `${r.label} (${r.class_index}) ${boxText(r.box)}`;
    $("shown-class").dataset.classIndex = r.class_index;
    $("info").textContent = `score ${r.score.toFixed(3)} · similarity ${r.similarity.toFixed(3)} · ${r.seconds.toFixed(2)} s ` +
      `on the server (${((performance.now() - t0) / 1000).toFixed(2)} s round trip) · ${r.provider} · ${r.passes} masked images` +
      (r.note ? ` · ${r.note}` : "");
    $("shown").hidden = false;
    for (const li of $("probs").children) li.classList.toggle("chosen", r.detection !== null && Number(li.dataset.detection) === r.detection);
    status("");
  } catch (e) {
    status("");
    showError(e.message);
  } finally {
    $("go").disabled = false;
  }
}

async function explain() {
  if (!state.b64) return;
  showError("");
  if (isDetector()) return explainBox();
  const typed = $("label").value.trim();
  const target = typed ? (/^\d+$/.test(typed) ? Number(typed) : typed) : Number($("target").value);
  const params = { preset: $("preset").value, overlay: true, alpha: 1.0 };
  if ($("fast").checked) Object.assign(params, { max_channels: 64, fill: "kernel" });  // unchecked: the server's default
  params.layers = $("fine").checked ? 3 : 1;  // fine: multi-layer Score-CAM, the target layer and two finer stages
  if ($("qrise").checked) params.mode = "qrise";  // one layer: "fine" and "qRISE" exclude each other
  $("go").disabled = true;
  status("explaining...");
  const t0 = performance.now();
  try {
    const data = await api(`/v1/models/${encodeURIComponent(state.model)}:explain`,
      { instances: [{ image: { b64: state.b64 }, targets: [target] }], parameters: params });
    const r = data.explanations[0].results[0];
    state.heat = await loadImage(`data:image/png;base64,${r.overlay.b64}`);
    draw();
    $("shown-class").textContent = `${r.label} (${r.class_index})`;
    $("shown-class").dataset.classIndex = r.class_index;
    $("info").textContent = `p = ${(100 * r.probability).toFixed(2)}% · ${r.seconds.toFixed(2)} s on the server ` +
      `(${((performance.now() - t0) / 1000).toFixed(2)} s round trip) · ${r.provider} · preset ${r.preset} · ` +
      (r.select === "all" ? `${r.channels_used} channels scored`
        : `${r.passes} masks scored (${r.select} + ${r.fill} fill)`)
      + (r.layers.length > 1 ? ` · ${r.layers.length} layers` : "") + (r.mode === "qrise" ? " · qRISE" : "");
    $("shown").hidden = false;
    for (const li of $("probs").children) li.classList.toggle("chosen", Number(li.dataset.classIndex) === r.class_index);
    status("");
  } catch (e) {
    status("");
    showError(e.message);
  } finally {
    $("go").disabled = false;
  }
}

$("file").addEventListener("change", (e) => pick(e.target.files[0]).catch((err) => showError(err.message)));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  pick(e.dataTransfer.files[0]).catch((err) => showError(err.message));
});
$("model").addEventListener("change", () => modelChanged().then(explain).catch((err) => showError(err.message)));
$("target").addEventListener("change", () => { $("label").value = ""; state.box = null; draw(); explain(); });
$("label").addEventListener("keydown", (e) => { if (e.key === "Enter") explain(); });
$("preset").addEventListener("change", explain);
$("fast").addEventListener("change", explain);
$("fine").addEventListener("change", () => { if ($("fine").checked) $("qrise").checked = false; explain(); });
$("qrise").addEventListener("change", () => { if ($("qrise").checked) $("fine").checked = false; explain(); });
$("go").addEventListener("click", explain);
$("opacity").addEventListener("input", () => { $("opacity-value").textContent = `${$("opacity").value}%`; draw(); });
loadModels().catch((err) => showError(err.message));
