// Loads each named adapter file into ia3.mjs and prints the error it raised (tests/web/test_js_runtime.py).
// Usage: node js_adapter_errors.mjs EXPORT_DIR key=FILE...
import { readFile } from "node:fs/promises";
import * as ort from "onnxruntime-node";
import { IA3Model } from "../../ia3_export/web/ia3.mjs";

const [folder, ...files] = process.argv.slice(2);
const model = await IA3Model.open(ort, folder, { sessionOptions: { logSeverityLevel: 3 } });
await model.loadAdapter("adapter1");
model.useAdapter("adapter1");
const before = (await model.generate([5, 6, 7], { maxNewTokens: 5 })).tokens;
const errors = {};
for (const arg of files) {
  const [key, path] = arg.split("=");
  try {
    await model.loadAdapter("adapter1", new Uint8Array(await readFile(path)));
    errors[key] = null;
  } catch (e) {
    errors[key] = { name: e.name, message: e.message };
  }
}
const optionErrors = {};
const tries = {
  maxNewTokens: () => model.generate([5], { maxNewTokens: 0 }),
  temperature: () => model.generate([5], { temperature: -1 }),
  topP: () => model.generate([5], { temperature: 1, topP: 0 }),
  text: () => model.generate("hello"),  // no tokenizer given
  long: () => model.generate(Array(model.config.max_position_embeddings).fill(5)),
  unloaded: async () => model.useAdapter("nope"),
  name: () => model.loadAdapter("../x", new Uint8Array(8)),
};
for (const [key, run] of Object.entries(tries)) {
  try {
    await run();
    optionErrors[key] = null;
  } catch (e) {
    optionErrors[key] = { name: e.name, message: e.message };
  }
}
const capped = (await model.generate(Array(model.config.max_position_embeddings - 2).fill(5), { maxNewTokens: 10 })).tokens.length;
const afterwards = (await model.generate([5, 6, 7], { maxNewTokens: 5 })).tokens;
console.log(JSON.stringify({ errors, optionErrors, capped, before, afterwards, adapters: model.adapters }));
