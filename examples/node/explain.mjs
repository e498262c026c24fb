// Score-CAM in Node.js with onnxruntime-node: no Python at run time.
//
//   node explain.mjs EXPLAINER.onnx PHOTO.png [--class N] [--out overlay.png]
//   node explain.mjs --check REFERENCE.json        (the test mode: compare with a map Python saved)
//
// EXPLAINER.onnx comes from `python -m exporter explainer MODEL --out EXPLAINER.onnx`. The PNG is decoded
// (pngjs), resized to the network's input size (bilinear), explained by the graph (the preprocessing,
// the masked passes and the weighting are all inside it) and the map is drawn over the photo.
import fs from "node:fs";
import path from "node:path";
import { performance } from "node:perf_hooks";
import * as ort from "onnxruntime-node";
import pngjs from "pngjs";

const { PNG } = pngjs;

function fail(message) {
  console.error(`error: ${message}`);
  process.exit(2);
}

function readPng(file) {
  let png;
  try {
    png = PNG.sync.read(fs.readFileSync(file));
  } catch (e) {
    fail(`${file}: cannot read a PNG (${e.message.split("\n")[0]})`);
  }
  return { width: png.width, height: png.height, rgba: png.data };
}

// Bilinear resize (half-pixel centres, edges clamped) of an interleaved image with `ch` channels.
function resize(src, w, h, ch, W, H, stride = ch) {
  const out = new Float32Array(W * H * ch);
  const sy = h / H, sx = w / W;
  for (let y = 0; y < H; y++) {
    const fy = Math.max((y + 0.5) * sy - 0.5, 0);
    const y0 = Math.min(Math.floor(fy), h - 1), y1 = Math.min(y0 + 1, h - 1), ly = fy - y0;
    for (let x = 0; x < W; x++) {
      const fx = Math.max((x + 0.5) * sx - 0.5, 0);
      const x0 = Math.min(Math.floor(fx), w - 1), x1 = Math.min(x0 + 1, w - 1), lx = fx - x0;
      for (let c = 0; c < ch; c++) {
        const a = src[(y0 * w + x0) * stride + c], b = src[(y0 * w + x1) * stride + c];
        const d = src[(y1 * w + x0) * stride + c], e = src[(y1 * w + x1) * stride + c];
        out[(y * W + x) * ch + c] = (a * (1 - lx) + b * lx) * (1 - ly) + (d * (1 - lx) + e * lx) * ly;
      }
    }
  }
  return out;
}

function rgbAt(img, H, W) {
  if (img.width === W && img.height === H) {  // already at the network's size: the exact pixels
    const rgb = new Uint8Array(W * H * 3);
    for (let i = 0; i < W * H; i++) for (let c = 0; c < 3; c++) rgb[i * 3 + c] = img.rgba[i * 4 + c];
    return rgb;
  }
  const f = resize(img.rgba, img.width, img.height, 3, W, H, 4);
  return Uint8Array.from(f, (v) => Math.min(255, Math.max(0, Math.round(v))));
}

export async function loadExplainer(file) {
  if (!fs.existsSync(file)) fail(`explainer not found: ${file}`);
  let session;
  try {
    session = await ort.InferenceSession.create(file, { executionProviders: ["cpu"] });
  } catch (e) {
    fail(`ONNX Runtime cannot load ${file}: ${e.message.split("\n")[0]}`);
  }
  const meta = session.inputMetadata.find((m) => m.name === "pixels");
  if (!meta || !meta.shape || meta.shape.length !== 4) fail(`${file} is not a Score-CAM explainer graph (no pixels input)`);
  return { session, H: Number(meta.shape[1]), W: Number(meta.shape[2]) };
}

export async function explain({ session, H, W }, rgb, classIndex = -1) {
  const feeds = {
    pixels: new ort.Tensor("uint8", rgb, [1, H, W, 3]),
    class_index: new ort.Tensor("int64", BigInt64Array.from([BigInt(classIndex)]), [1]),
  };
  const t0 = performance.now();
  const out = await session.run(feeds);
  const ms = performance.now() - t0;
  const cls = Number(out.explained_class.data[0]);
  return { saliency: out.saliency.data, classIndex: cls, probability: out.probabilities.data[cls], ms };
}

// JET colour map (blue -> red), as the Python overlay, blended over the photo with `alpha`.
function overlay(img, saliency, H, W, alpha = 0.5) {
  const sal = resize(saliency, W, H, 1, img.width, img.height);
  const png = new PNG({ width: img.width, height: img.height });
  const clamp = (v) => Math.min(1, Math.max(0, v));
  for (let i = 0; i < img.width * img.height; i++) {
    const t = sal[i];
    const jet = [clamp(1.5 - Math.abs(4 * t - 3)), clamp(1.5 - Math.abs(4 * t - 2)), clamp(1.5 - Math.abs(4 * t - 1))];
    for (let c = 0; c < 3; c++) png.data[i * 4 + c] = Math.round((1 - alpha) * img.rgba[i * 4 + c] + alpha * 255 * jet[c]);
    png.data[i * 4 + 3] = 255;
  }
  return PNG.sync.write(png);
}

async function check(refFile) {
  const ref = JSON.parse(fs.readFileSync(refFile, "utf8"));
  const here = path.dirname(refFile);
  const explainer = await loadExplainer(path.resolve(here, ref.model));
  const img = readPng(path.resolve(here, ref.image));
  if (img.width !== explainer.W || img.height !== explainer.H) fail("the reference image must be at the network's size");
  const want = new Float32Array(fs.readFileSync(path.resolve(here, ref.saliency)).buffer.slice(0));
  const results = [];
  for (let rep = 0; rep < (ref.repeats || 1); rep++) {
    results.push(await explain(explainer, rgbAt(img, explainer.H, explainer.W), ref.class_index));
  }
  const got = results[results.length - 1];
  let maxAbs = 0;
  for (let i = 0; i < want.length; i++) maxAbs = Math.max(maxAbs, Math.abs(got.saliency[i] - want[i]) || (Number.isNaN(got.saliency[i]) ? Infinity : 0));
  const ok = got.classIndex === ref.expected_class && got.saliency.length === want.length && maxAbs <= ref.tolerance;
  console.log(JSON.stringify({ ok, class_index: got.classIndex, expected_class: ref.expected_class,
    max_abs_diff: maxAbs, tolerance: ref.tolerance, ms: results.map((r) => Math.round(r.ms)) }));
  process.exit(ok ? 0 : 1);
}

async function main(argv) {
  if (argv[0] === "--check") {
    if (!argv[1]) fail("--check needs the reference JSON written by the Python test");
    return check(argv[1]);
  }
  if (argv.length < 2 || argv.includes("--help") || argv.includes("-h")) {
    console.log("usage: node explain.mjs EXPLAINER.onnx PHOTO.png [--class N] [--out overlay.png]\n" +
      "       node explain.mjs --check REFERENCE.json");
    process.exit(argv.includes("--help") || argv.includes("-h") ? 0 : 2);
  }
  const [model, photo] = argv;
  const opt = (name, dflt) => { const i = argv.indexOf(name); return i > 0 && argv[i + 1] !== undefined ? argv[i + 1] : dflt; };
  const classIndex = Number(opt("--class", "-1"));
  if (!Number.isInteger(classIndex)) fail(`--class must be an integer, got ${opt("--class")}`);
  const out = opt("--out", path.basename(photo).replace(/\.png$/i, "") + ".scorecam.png");
  const explainer = await loadExplainer(model);
  const img = readPng(photo);
  let res;
  try {
    res = await explain(explainer, rgbAt(img, explainer.H, explainer.W), classIndex);
  } catch (e) {
    fail(`the explainer failed: ${e.message.split("\n")[0]}`);
  }
  fs.writeFileSync(out, overlay(img, res.saliency, explainer.H, explainer.W));
  console.log(`class ${res.classIndex} (p=${res.probability.toFixed(3)}), ${Math.round(res.ms)} ms; overlay written: ${out}`);
}

main(process.argv.slice(2));
