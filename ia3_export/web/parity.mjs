// The JavaScript side of `ia3-export parity --runtime node`: runs what the Python check asks through
// ia3.mjs on onnxruntime-node, one JSON request per stdin line, one reply per stdout line (prefixed,
// so nothing ONNX Runtime prints is taken for a reply). Usage: node parity.mjs NODE_MODULES_DIR
// (the folder whose onnxruntime-node is used: the user's project, not this package).
import { createRequire } from "node:module";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { IA3Model, VERSION } from "./ia3.mjs";

const REPLY = "@ia3@ ";
const TYPES = { float32: Float32Array, float16: Uint16Array, int64: BigInt64Array, int32: Int32Array, bool: Uint8Array };

function decode(ort, t) {
  const bytes = Buffer.from(t.b64, "base64");
  const Type = TYPES[t.dtype];
  if (!Type) throw new Error(`tensor type ${t.dtype} is not handled by the parity runner`);
  const data = new Type(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength));
  return new ort.Tensor(t.dtype, t.dtype === "bool" ? Uint8Array.from(data) : data, t.dims);
}

function encode(tensor) {
  const d = tensor.data;
  return { dtype: tensor.type, dims: tensor.dims.map(Number), b64: Buffer.from(d.buffer, d.byteOffset, d.byteLength).toString("base64") };
}

const ort = createRequire(import.meta.url)(join(process.argv[2], "onnxruntime-node"));  // that very folder's package
let model = null;

const handlers = {
  async open({ folder }) {
    model = await IA3Model.open(ort, folder, { sessionOptions: { logSeverityLevel: 3 } });
    return { version: VERSION, inputs: model.session.inputNames, outputs: model.session.outputNames, mode: model.mode };
  },
  async load({ name, path }) {
    const { readFile } = await import("node:fs/promises");
    return model.loadAdapter(name, new Uint8Array(await readFile(path)));
  },
  async vectors({ name }) {
    const values = model.adapterVectors(name);
    return Object.fromEntries(Object.entries(values).map(([k, v]) => [k, Buffer.from(v.buffer, v.byteOffset, v.byteLength).toString("base64")]));
  },
  async run({ feeds, rows, outputs }) {
    const decoded = Object.fromEntries(Object.entries(feeds).map(([k, t]) => [k, decode(ort, t)]));
    const out = await model.run(decoded, rows);
    return Object.fromEntries(outputs.map((n) => [n, encode(out[n])]));
  },
  async generate({ ids, adapter, maxNewTokens }) {
    model.useAdapter(adapter);
    return (await model.generate(ids, { maxNewTokens })).tokens;
  },
};

for await (const line of createInterface({ input: process.stdin })) {
  let reply;
  try {
    const request = JSON.parse(line);
    reply = { result: await handlers[request.op](request) };
  } catch (e) {
    reply = { error: `${e.name === "IA3Error" ? "" : e.name + ": "}${String(e.message).split("\n")[0]}` };
  }
  process.stdout.write(REPLY + JSON.stringify(reply) + "\n");
}
