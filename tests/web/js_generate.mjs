// Drives ia3.mjs on one export and prints one JSON line for tests/web/test_js_runtime.py to check
// against Python's runtime and PEFT. Usage: node js_generate.mjs EXPORT_DIR node|web PROMPT_IDS_JSON TEXT
// node: onnxruntime-node with @huggingface/tokenizers (transformers.js 4.3.2 loads its own onnxruntime-node
// 1.30.0 library on import, and one process cannot hold two); web: onnxruntime-web (WASM) with
// transformers.js' AutoTokenizer, as a page has them.
import { readFile } from "node:fs/promises";
import { basename, dirname } from "node:path";
import { IA3Model, VERSION } from "../../ia3_export/web/ia3.mjs";

const [folder, backend, idsJson, text] = process.argv.slice(2);
let ort, tokenizer;
if (backend === "web") {
  ort = await import("onnxruntime-web");
  const { AutoTokenizer, env } = await import("@huggingface/transformers");
  env.allowRemoteModels = false;
  env.localModelPath = dirname(folder) + "/";
  tokenizer = await AutoTokenizer.from_pretrained(basename(folder));
} else {
  ort = await import("onnxruntime-node");
  const { Tokenizer } = await import("@huggingface/tokenizers");
  const json = async (name) => JSON.parse(await readFile(`${folder}/${name}`, "utf8"));
  tokenizer = new Tokenizer(await json("tokenizer.json"), await json("tokenizer_config.json"));
}
const model = await IA3Model.open(ort, folder, { tokenizer, sessionOptions: { logSeverityLevel: 3 } });
const prompt = JSON.parse(idsJson);
const out = { version: VERSION, mode: model.mode, adaptersAtOpen: model.adapters, loads: [], greedy: [], switchMs: [] };
if (model.mode === "swappable") {
  out.loads.push(await model.loadAdapter("adapter1"));  // the file the export ships
  out.loads.push(await model.loadAdapter("adapter2", new Uint8Array(await readFile(`${folder}/adapters/adapter2.onnx_adapter`))));  // bytes read by the caller
}
for (const name of [null, "adapter1", "adapter2", null, "adapter1"]) {  // switches in one live session
  out.switchMs.push(model.useAdapter(name));
  const ids = await model.generate(prompt, { maxNewTokens: 8 });
  const words = await model.generate(text, { maxNewTokens: 6 });
  out.greedy.push({ adapter: name, tokens: ids.tokens, textTokens: words.tokens, text: words.text });
}
model.useAdapter("adapter2");
const streamed = [];
let resolved = false;
const result = await model.generate(text, { maxNewTokens: 6, onToken: (id, piece) => streamed.push([id, piece, resolved]) });
resolved = true;
out.stream = { calls: streamed, result: { tokens: result.tokens, text: result.text } };
const sample = (o) => model.generate(prompt, { maxNewTokens: 8, ...o }).then((r) => r.tokens);
out.sampled = {
  a: await sample({ temperature: 0.9, topP: 0.95, seed: 7 }),
  b: await sample({ temperature: 0.9, topP: 0.95, seed: 7 }),
  c: await sample({ temperature: 5, seed: 8 }),
  tinyTemperature: await sample({ temperature: 1e-6, seed: 1 }),
  tinyTopP: await sample({ temperature: 1, topP: 1e-6, seed: 2 }),
  greedy: await sample({}),
};
const logits = await model.logits(prompt);
out.logits = { dims: logits.dims, b64: Buffer.from(logits.data.buffer, logits.data.byteOffset, logits.data.byteLength).toString("base64") };
try {
  await model.run({ ...model._prefill(prompt), "model.layers.0.self_attn.q_proj.ia3_l": new ort.Tensor("float32", new Float32Array(16), [16]) });
  out.unknownFeed = null;
} catch (e) {
  out.unknownFeed = e.message;
}
await model.release();
console.log(JSON.stringify(out));
