// The demo page: load one swappable export into onnxruntime-web, load every adapter prepare.py wrote,
// switch between them in the live session and stream greedy text. What it measured is shown on the page and
// kept in window.ia3demo, which the browser test (tests/web/browser_demo.mjs) and scripts/bench_web.py read.
import * as ort from "onnxruntime-web";

const BUILD = new URL("/build/web/", location.href);
const THREADS = Number(new URLSearchParams(location.search).get("threads") ?? 2);
const $ = (id) => document.getElementById(id);

const state = { sessionsOpened: 0, switches: [], adapters: {}, runs: [] };
window.ia3demo = { state, ort, ready: null, model: null };

function setStatus(text, kind) {
  $("status").textContent = text;
  $("status").dataset.state = kind;
  document.body.dataset.state = kind;
}

function sizeRow(label, bytes) {
  const tr = document.createElement("tr");
  tr.innerHTML = `<td></td><td class="num"></td>`;
  tr.children[0].textContent = label;
  tr.children[1].textContent = bytes.toLocaleString("en");
  tr.dataset.bytes = String(bytes);
  $("sizes").tBodies[0].append(tr);
}

async function fetchBytes(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}; run python examples/web/prepare.py`);
  return new Uint8Array(await response.arrayBuffer());
}

async function start() {
  // Before transformers.js is imported: it would otherwise point ORT at a CDN for the WASM files.
  ort.env.wasm.numThreads = THREADS;
  ort.env.wasm.wasmPaths = new URL("/node_modules/onnxruntime-web/dist/", location.href).href;
  globalThis[Symbol.for("onnxruntime")] = ort;
  const create = ort.InferenceSession.create.bind(ort.InferenceSession);
  ort.InferenceSession.create = (...args) => { state.sessionsOpened += 1; return create(...args); };

  const demo = await (await fetch(new URL("demo.json", BUILD))).json();
  const [{ IA3Model }, { AutoTokenizer, env }] = await Promise.all([
    import(new URL(demo.module, BUILD).href), import("@huggingface/transformers")]);
  env.allowRemoteModels = false;
  env.allowLocalModels = true;
  env.localModelPath = BUILD.pathname;  // a path: transformers.js reads full URLs as remote models
  env.useBrowserCache = false;
  const tokenizer = await AutoTokenizer.from_pretrained(demo.model.replace(/\/$/, ""));

  const opened = performance.now();
  const model = await IA3Model.open(ort, new URL(demo.model, BUILD).href, { tokenizer });
  state.openMs = performance.now() - opened;
  window.ia3demo.model = model;
  sizeRow("base model graph (swappable export, loaded once)", demo.base.bytes);
  for (const entry of demo.adapters) {
    const loaded = await model.loadAdapter(entry.name, await fetchBytes(new URL(entry.file, BUILD)));
    state.adapters[entry.name] = { bytes: loaded.bytes ?? entry.bytes, fileBytes: entry.bytes, loadMs: loaded.ms };
    sizeRow(`adapter ${entry.name}`, entry.bytes);
  }
  sizeRow(`for comparison: a merged model graph with ${demo.merged.adapter} folded in`, demo.merged.bytes);

  state.threads = ort.env.wasm.numThreads;
  state.crossOriginIsolated = globalThis.crossOriginIsolated === true;
  state.ortVersion = ort.env.versions?.web ?? null;
  $("env").textContent = `onnxruntime-web ${state.ortVersion}, WASM, ${state.threads} thread(s), ` +
    `cross-origin isolated: ${state.crossOriginIsolated}; opened in ${state.openMs.toFixed(0)} ms`;

  const select = $("adapter");
  select.append(new Option("(base model, no adapter)", ""));
  for (const name of model.adapters) select.append(new Option(name, name));
  for (const p of demo.prompts) $("prompts").append(new Option(p, p));
  $("prompt").value = demo.prompts[0];
  select.addEventListener("change", () => useAdapter(select.value || null));
  $("generate").addEventListener("click", () => generate());
  $("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter") generate(); });
  for (const el of [select, $("prompt"), $("generate")]) el.disabled = false;
  setStatus("ready", "ready");
}

function useAdapter(name) {
  const ms = window.ia3demo.model.useAdapter(name);
  state.switches.push({ adapter: name, ms });
  state.active = name;
  $("switch-ms").textContent = `${ms.toFixed(3)} ms`;
  $("switch-ms").dataset.ms = String(ms);
  return ms;
}

async function generate() {
  const model = window.ia3demo.model;
  const prompt = $("prompt").value;
  const maxNewTokens = Math.max(1, Math.min(96, Number($("max-tokens").value) || 24));
  const out = $("output");
  out.textContent = "";
  const shown = document.createElement("span");
  shown.className = "prompt";
  shown.textContent = prompt;
  const text = document.createTextNode("");
  out.append(shown, text);
  for (const el of [$("adapter"), $("prompt"), $("generate")]) el.disabled = true;
  setStatus("generating…", "generating");
  try {
    const result = await model.generate(prompt, {
      maxNewTokens, temperature: 0, onToken: (id, piece) => { if (piece) text.appendData(piece); } });
    const tokensPerS = result.tokens.length / (result.ms / 1000);
    state.runs.push({ adapter: state.active ?? null, prompt, text: result.text, tokens: result.tokens,
                      ms: result.ms, firstTokenMs: result.firstTokenMs });
    out.dataset.text = result.text ?? "";
    $("speed").textContent = `${result.tokens.length} tokens in ${result.ms.toFixed(0)} ms ` +
      `(${tokensPerS.toFixed(1)} tokens/s, first after ${result.firstTokenMs.toFixed(0)} ms)`;
    setStatus("done", "done");
  } catch (e) {
    setStatus(`error: ${e.message}`, "error");
    throw e;
  } finally {
    for (const el of [$("adapter"), $("prompt"), $("generate")]) el.disabled = false;
  }
}

window.ia3demo.ready = start().catch((e) => { setStatus(`error: ${e.message}`, "error"); console.error(e); throw e; });
