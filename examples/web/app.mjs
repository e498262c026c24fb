// Score-CAM in the browser: the one-graph explainer on onnxruntime-web (wasm backend, one thread, so no
// cross-origin isolation is needed). Every file is served from this folder: the page, node_modules/
// (npm install) and the model (?model=URL, default explainer.onnx beside this page).
import * as ort from "./node_modules/onnxruntime-web/dist/ort.wasm.min.mjs";

ort.env.wasm.wasmPaths = new URL("./node_modules/onnxruntime-web/dist/", import.meta.url).href;
ort.env.wasm.numThreads = 1;
ort.env.wasm.proxy = false;

const params = new URLSearchParams(location.search);
const modelUrl = params.get("model") || "explainer.onnx";
const status = document.getElementById("status");

function say(text, error = false) {
  status.textContent = text;
  status.className = error ? "error" : "";
}

async function load() {
  const session = await ort.InferenceSession.create(modelUrl, { executionProviders: ["wasm"] });
  const meta = session.inputMetadata.find((m) => m.name === "pixels");
  if (!meta || !meta.shape || meta.shape.length !== 4) throw new Error(`${modelUrl} is not a Score-CAM explainer graph`);
  return { session, H: Number(meta.shape[1]), W: Number(meta.shape[2]) };
}

const ready = load();

// rgb: Uint8Array H*W*3 at the network's size -> { classIndex, probability, saliency Float32Array H*W, ms }
async function explainPixels(rgb, classIndex = -1) {
  const { session, H, W } = await ready;
  if (rgb.length !== H * W * 3) throw new Error(`expected ${H}x${W}x3 pixels, got ${rgb.length} values`);
  const t0 = performance.now();
  const out = await session.run({
    pixels: new ort.Tensor("uint8", Uint8Array.from(rgb), [1, H, W, 3]),
    class_index: new ort.Tensor("int64", BigInt64Array.from([BigInt(classIndex)]), [1]),
  });
  const ms = performance.now() - t0;
  const cls = Number(out.explained_class.data[0]);
  return { classIndex: cls, probability: out.probabilities.data[cls], saliency: out.saliency.data, ms };
}

function jet(t) {
  const c = (v) => Math.round(255 * Math.min(1, Math.max(0, v)));
  return [c(1.5 - Math.abs(4 * t - 3)), c(1.5 - Math.abs(4 * t - 2)), c(1.5 - Math.abs(4 * t - 1))];
}

async function explainFile(file, classIndex) {
  const { H, W } = await ready;
  const bitmap = await createImageBitmap(file);
  const small = new OffscreenCanvas(W, H);  // the photo at the network's size (the browser's resampling)
  const sctx = small.getContext("2d");
  sctx.drawImage(bitmap, 0, 0, W, H);
  const rgba = sctx.getImageData(0, 0, W, H).data;
  const rgb = new Uint8Array(W * H * 3);
  for (let i = 0; i < W * H; i++) for (let c = 0; c < 3; c++) rgb[i * 3 + c] = rgba[i * 4 + c];
  say(`explaining ${file.name} (${bitmap.width}x${bitmap.height}) ...`);
  const res = await explainPixels(rgb, classIndex);
  const heat = new OffscreenCanvas(W, H);  // the map as a JET image, scaled over the photo (bilinear)
  const hctx = heat.getContext("2d");
  const img = hctx.createImageData(W, H);
  for (let i = 0; i < W * H; i++) {
    const [r, g, b] = jet(res.saliency[i]);
    img.data.set([r, g, b, 255], i * 4);
  }
  hctx.putImageData(img, 0, 0);
  const view = document.getElementById("view");
  view.width = bitmap.width;
  view.height = bitmap.height;
  const ctx = view.getContext("2d");
  ctx.drawImage(bitmap, 0, 0);
  ctx.globalAlpha = 0.5;
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(heat, 0, 0, bitmap.width, bitmap.height);
  ctx.globalAlpha = 1;
  say(`class ${res.classIndex} (p=${res.probability.toFixed(3)}), ${Math.round(res.ms)} ms in the browser`);
  document.body.dataset.classIndex = String(res.classIndex);
  return res;
}

ready.then(({ H, W }) => {
  say(`ready: ${modelUrl}, input ${W}x${H}; pick a photo`);
  const input = document.getElementById("photo");
  input.disabled = false;
  input.addEventListener("change", () => {
    const file = input.files[0];
    const cls = Number(document.getElementById("class").value || -1);
    if (file) explainFile(file, Number.isInteger(cls) ? cls : -1).catch((e) => say(`error: ${e.message}`, true));
  });
  document.body.dataset.ready = "1";
}, (e) => { say(`error: cannot load ${modelUrl}: ${e.message}`, true); document.body.dataset.ready = "error"; });

window.scorecam = { ready, explainPixels, explainFile };
