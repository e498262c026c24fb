// The explain service's page: no framework, nothing from a CDN; it talks to the same app's API.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { bytes: null, b64: null, photo: null, heat: null, model: null };

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
}

async function loadModels() {
  const data = await api("/ui/models");
  $("model").innerHTML = "";
  for (const m of data.models) $("model").add(new Option(`${m.name} (${m.labels} classes, ${m.provider})`, m.name));
  $("preset").innerHTML = "";
  for (const p of data.presets) $("preset").add(new Option(p, p));
  $("preset").value = data.models.length ? data.models[0].preset : "paper";
  await modelChanged();
}

async function modelChanged() {
  state.model = $("model").value;
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
  $("shown").hidden = true;
  try {
    state.photo = await loadImage(URL.createObjectURL(file));
  } catch (e) { state.photo = null; }
  draw();
  await predict();
  await explain();
}

async function predict() {
  status("classifying...");
  const data = await api(`/v1/models/${encodeURIComponent(state.model)}:predict`, { instances: [{ image: { b64: state.b64 } }] });
  const preds = data.predictions[0];
  const sel = $("target");
  sel.innerHTML = "";
  for (const p of preds) sel.add(new Option(`${p.label} — ${(100 * p.probability).toFixed(1)}%`, String(p.class_index)));
  sel.disabled = false;
  $("go").disabled = false;
  renderProbs(preds, preds[0].class_index);
  status("");
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

async function explain() {
  if (!state.b64) return;
  showError("");
  const typed = $("label").value.trim();
  const target = typed ? (/^\d+$/.test(typed) ? Number(typed) : typed) : Number($("target").value);
  const params = { preset: $("preset").value, overlay: true, alpha: 1.0 };
  if ($("fast").checked) Object.assign(params, { max_channels: 64, fill: "kernel" });  // unchecked: the server's default
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
        : `${r.passes} masks scored (${r.select} + ${r.fill} fill)`);
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
$("target").addEventListener("change", () => { $("label").value = ""; explain(); });
$("label").addEventListener("keydown", (e) => { if (e.key === "Enter") explain(); });
$("preset").addEventListener("change", explain);
$("fast").addEventListener("change", explain);
$("go").addEventListener("click", explain);
$("opacity").addEventListener("input", () => { $("opacity-value").textContent = `${$("opacity").value}%`; draw(); });
loadModels().catch((err) => showError(err.message));
