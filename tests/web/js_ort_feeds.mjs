// Why ia3.mjs edits the graph (docs/web.md): what each ONNX Runtime for JavaScript does when a run
// feeds an overridable initializer (a vector) by name on the export as written.
// Usage: node js_ort_feeds.mjs EXPORT_DIR VECTOR_NAME DIM
import { readFile } from "node:fs/promises";

const [folder, vector, dim] = process.argv.slice(2);
const out = {};
for (const backend of ["onnxruntime-node", "onnxruntime-web"]) {
  const ort = await import(backend);
  const session = await ort.InferenceSession.create(new Uint8Array(await readFile(`${folder}/model.onnx`)), { logSeverityLevel: 3 });
  const manifest = JSON.parse(await readFile(`${folder}/ia3_export.json`, "utf8"));
  const int64 = (v) => new ort.Tensor("int64", BigInt64Array.from(v, BigInt), [1, v.length]);
  const feeds = { input_ids: int64([5, 6, 7]), attention_mask: int64([1, 1, 1]), position_ids: int64([0, 1, 2]) };
  for (const n of session.inputNames) {
    if (n.startsWith("past_key_values")) feeds[n] = new ort.Tensor("float32", new Float32Array(0), [1, manifest.cache.num_kv_heads, 0, manifest.cache.head_dim]);
  }
  const base = (await session.run(feeds)).logits.data;
  const entry = { listed: session.inputNames.includes(vector) };
  try {
    const fed = (await session.run({ ...feeds, [vector]: new ort.Tensor("float32", new Float32Array(Number(dim)).fill(3), [Number(dim)]) })).logits.data;
    entry.changed = fed.some((x, i) => x !== base[i]);
  } catch (e) {
    entry.error = e.message;
  }
  out[backend] = entry;
}
console.log(JSON.stringify(out));
