// scripts/bench_web.py's onnxruntime-node runner: node scripts/bench_web_node.mjs FOLDER SPEC_JSON
// FOLDER is what examples/web/prepare.py wrote (model/, js/ia3.mjs, demo.json); SPEC_JSON:
// {"threads": 2, "maxNewTokens": N, "repeats": R, "ids": [...], "adapters": [names to time]}.
// Prints one JSON line: {adapter: timeGenerate's result} plus the load times.
import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";
import * as ort from "onnxruntime-node";
import { timeGenerate } from "../examples/web/bench.mjs";

const [folder, specJson] = process.argv.slice(2);
const spec = JSON.parse(specJson);
const demo = JSON.parse(fs.readFileSync(path.join(folder, "demo.json"), "utf8"));
const { IA3Model } = await import(pathToFileURL(path.join(folder, demo.module)).href);
const opened = performance.now();
const model = await IA3Model.open(ort, path.join(folder, demo.model), {
  sessionOptions: { intraOpNumThreads: spec.threads, interOpNumThreads: 1 } });
const openMs = performance.now() - opened;
for (const a of demo.adapters) await model.loadAdapter(a.name, new Uint8Array(fs.readFileSync(path.join(folder, a.file))));
const runs = {};
for (const adapter of spec.adapters) runs[adapter ?? "(base)"] = await timeGenerate(model, { ...spec, adapter });
await model.release();
process.stdout.write(JSON.stringify({ openMs, runs, ort: ort.env.versions?.node ?? null }) + "\n");
