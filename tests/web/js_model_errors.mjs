// Opens each named export folder with ia3.mjs, then loads its shipped adapter, and prints what happened
// (tests/web/test_js_runtime.py): the error raised, or what the model generated.
// Usage: node js_model_errors.mjs key=EXPORT_DIR...
import * as ort from "onnxruntime-node";
import { IA3Model } from "../../ia3_export/web/ia3.mjs";

const out = {};
for (const arg of process.argv.slice(2)) {
  const [key, folder] = arg.split("=");
  try {
    const model = await IA3Model.open(ort, folder, { sessionOptions: { logSeverityLevel: 3 } });
    await model.loadAdapter("adapter1");
    model.useAdapter("adapter1");
    out[key] = { tokens: (await model.generate([5, 6, 7], { maxNewTokens: 3 })).tokens };
  } catch (e) {
    out[key] = { name: e.name, message: e.message };
  }
}
console.log(JSON.stringify(out));
