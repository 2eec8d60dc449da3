// ia3.mjs: swappable, bank and merged ia3-export folders in JavaScript, on onnxruntime-node or
// onnxruntime-web (the caller passes the ORT module in; this file imports no package).
// Shipped in the ia3-export wheel and versioned with it (docs/web.md, "The JavaScript module").
//
// Why the graph is edited at load: a vector is an overridable initializer (a graph input with a
// same-name initializer of ones). onnxruntime-web refuses to feed a name not in `inputNames`, and
// onnxruntime-node (1.31.1) silently IGNORES it (the run uses the ones). So the initializers of the
// vectors are dropped from the model bytes (a few lines of protobuf, below): the vectors become plain
// inputs that every run feeds, and a switch is a change of which tensors are fed.
// Adapter files are ORT's own `.onnx_adapter` (flatbuffers: the files `ia3-export export` ships and
// `ia3-export convert` writes), parsed here, so the same file works on node and in the browser.

export const VERSION = "0.1.0";

export class IA3Error extends Error {
  constructor(message) { super(message); this.name = "IA3Error"; }
}

const VECTOR_SUFFIX = ".ia3_l";
const ADAPTER_IDS = "adapter_ids";
const PAST = "past_key_values";
const PRESENT = "present";

// -- reading files ------------------------------------------------------------------------------
/** `rel` where it names a file inside the export's folder; the manifest (or a caller) naming one
 * elsewhere ("..", an absolute path, a URL) is refused before anything is read. */
function insideFolder(rel) {
  if (typeof rel !== "string" || !rel || rel.startsWith("/") || rel.includes("\\") || /^[A-Za-z][A-Za-z0-9+.-]*:/.test(rel)
      || rel.split("/").some((part) => part === ".." || part === "")) {
    throw new IA3Error(`${JSON.stringify(rel)} is not a path inside the export's folder (no "..", no leading "/", no URL); name a file in the folder or re-export the model`);
  }
  return rel;
}

/** A function reading a file of the export (relative path -> Uint8Array), confined to its folder. */
function reader(source) {
  const read = unconfinedReader(source);
  return (rel) => read(insideFolder(rel));
}

function unconfinedReader(source) {
  if (source && typeof source.read === "function") return (rel) => source.read(rel);
  if (typeof source !== "string") throw new IA3Error("source must be a folder path, a URL base or { read(relativePath) }");
  const node = typeof process !== "undefined" && Boolean(process.versions?.node);
  if (/^(https?|blob|data|file):/.test(source) || !node) {  // a page or worker: fetch, relative to it
    const base = source.endsWith("/") ? source : source + "/";
    return async (rel) => {
      const response = await fetch(base + rel);
      if (!response.ok) throw new IA3Error(`${base + rel}: HTTP ${response.status}`);
      return new Uint8Array(await response.arrayBuffer());
    };
  }
  return async (rel) => {
    const { readFile } = await import("node:fs/promises");
    const { join } = await import("node:path");
    try {
      return new Uint8Array(await readFile(join(source, rel)));
    } catch (e) {
      throw new IA3Error(`${join(source, rel)}: cannot read (${e.code || e.message})`);
    }
  };
}

async function readJson(read, rel, optional = false) {
  let bytes;
  try {
    bytes = await read(rel);
  } catch (e) {
    if (optional) return {};
    throw e;
  }
  try {
    return JSON.parse(new TextDecoder().decode(bytes));
  } catch (e) {
    throw new IA3Error(`${rel}: not valid JSON (${e.message})`);
  }
}

// -- protobuf: drop the vectors' initializers from a ModelProto ---------------------------------
function varint(buf, pos) {
  let value = 0, scale = 1, byte;
  do {
    if (pos >= buf.length) throw new IA3Error("model.onnx is truncated (a varint runs past its end); re-export the model");
    byte = buf[pos++];
    value += (byte & 0x7f) * scale;
    scale *= 128;
  } while (byte & 0x80);
  return [value, pos];
}

function encodeVarint(value) {
  const out = [];
  while (value >= 128) { out.push((value % 128) | 0x80); value = Math.floor(value / 128); }
  out.push(value);
  return Uint8Array.from(out);
}

// Yields [field, wireType, start of the tag, start of the data, end] for each field in buf[start, end).
function* fields(buf, start, end) {
  let pos = start;
  while (pos < end) {
    const tagStart = pos;
    let tag;
    [tag, pos] = varint(buf, pos);
    const field = Math.floor(tag / 8), wire = tag % 8;
    let dataStart = pos, fieldEnd;
    if (wire === 0) fieldEnd = varint(buf, pos)[1];
    else if (wire === 1) fieldEnd = pos + 8;
    else if (wire === 5) fieldEnd = pos + 4;
    else if (wire === 2) { let len; [len, dataStart] = varint(buf, pos); fieldEnd = dataStart + len; }
    else throw new IA3Error(`model.onnx: unknown protobuf wire type ${wire}; is it an ONNX model?`);
    if (fieldEnd > end) throw new IA3Error("model.onnx is truncated (a field runs past its end); re-export the model");
    yield [field, wire, tagStart, dataStart, fieldEnd];
    pos = fieldEnd;
  }
}

function tensorName(buf, start, end) {
  for (const [field, wire, , s, e] of fields(buf, start, end)) {
    if (field === 8 && wire === 2) return new TextDecoder().decode(buf.subarray(s, e));  // TensorProto.name
  }
  return "";
}

function concat(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}

/** The model bytes without the initializers named in `names` (ModelProto.graph = 7, GraphProto.initializer = 5). */
export function dropInitializers(model, names) {
  const wanted = new Set(names);
  const parts = [];
  let dropped = 0, graphs = 0;
  for (const [field, wire, tagStart, dataStart, end] of fields(model, 0, model.length)) {
    if (field !== 7 || wire !== 2) { parts.push(model.subarray(tagStart, end)); continue; }
    graphs += 1;
    const graph = [];
    for (const [f, w, t, s, e] of fields(model, dataStart, end)) {
      if (f === 5 && w === 2 && wanted.has(tensorName(model, s, e))) { dropped += 1; continue; }
      graph.push(model.subarray(t, e));
    }
    const body = concat(graph);
    parts.push(model.subarray(tagStart, tagStart + 1), encodeVarint(body.length), body);  // tag 0x3a: one byte
  }
  if (graphs !== 1) throw new IA3Error("model.onnx holds no graph; is it an ONNX model?");
  if (dropped !== wanted.size) {
    throw new IA3Error(`model.onnx has ${dropped} of the manifest's ${wanted.size} vector initializers; re-export the model`);
  }
  return concat(parts);
}

// -- ORT's .onnx_adapter (flatbuffers, file identifier "TORT") ----------------------------------
// table Adapter { format_version:int; adapter_version:int; model_version:int; parameters:[Parameter]; }
// table Parameter { name:string; dims:[int64]; data_type:TensorDataType; raw_data:[uint8]; }
const FB_TYPES = { 1: "F32", 10: "F16" };
const FB_NAMES = { 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64", 9: "BOOL", 11: "DOUBLE", 16: "BFLOAT16" };

/** name -> { dtype: "F32" | "F16", dims: number[], data: Float32Array } from .onnx_adapter bytes. */
export function parseOnnxAdapter(bytes, where = "adapter") {
  const bad = (why) => new IA3Error(`${where}: not a readable .onnx_adapter file (${why}); write it with ia3-export convert`);
  if (!(bytes instanceof Uint8Array)) throw new IA3Error(`${where}: adapter bytes must be a Uint8Array`);
  if (bytes.length < 8) throw bad(`${bytes.length} bytes, shorter than its header`);
  if (new TextDecoder().decode(bytes.subarray(4, 8)) !== "TORT") throw bad("no TORT file identifier");
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const u32 = (at) => { if (at < 0 || at + 4 > bytes.length) throw bad("truncated"); return view.getUint32(at, true); };
  const table = (at) => {
    const vtable = at - view.getInt32(at, true);
    if (vtable < 0 || vtable + 4 > bytes.length) throw bad("truncated");
    const size = view.getUint16(vtable, true);
    return (i) => {  // byte position of field i, or null when absent
      if (4 + 2 * i >= size) return null;
      const off = view.getUint16(vtable + 4 + 2 * i, true);
      return off ? at + off : null;
    };
  };
  const vector = (at) => { const start = at + u32(at); const n = u32(start); return [start + 4, n]; };
  const root = u32(0);
  u32(root);
  const adapter = table(root);
  const version = adapter(0);
  if (version !== null && u32(version) !== 1) throw bad(`format version ${u32(version)}, this module reads 1`);
  const paramsAt = adapter(3);
  if (paramsAt === null) throw bad("no parameters");
  const [first, count] = vector(paramsAt);
  const out = {};
  for (let k = 0; k < count; k++) {
    const at = first + 4 * k;
    const p = table(at + u32(at));
    const [nameStart, nameLen] = vector(p(0) ?? bad("a parameter without a name"));
    if (nameStart + nameLen > bytes.length) throw bad("truncated");
    const name = new TextDecoder().decode(bytes.subarray(nameStart, nameStart + nameLen));
    const dims = [];
    if (p(1) !== null) {
      const [d, nd] = vector(p(1));
      if (d + 8 * nd > bytes.length || nd > 8) throw bad(`bad dims for ${name}`);
      for (let i = 0; i < nd; i++) dims.push(Number(view.getBigInt64(d + 8 * i, true)));
    }
    const code = p(2) === null ? 0 : view.getInt32(p(2), true);
    const dtype = FB_TYPES[code];
    if (!dtype) {
      throw new IA3Error(`${where}: ${name} is ${FB_NAMES[code] || `type ${code}`}; IA3 vectors must be float32 or float16`);
    }
    const [raw, rawLen] = p(3) === null ? [0, 0] : vector(p(3));
    const width = dtype === "F32" ? 4 : 2;
    const n = dims.reduce((a, b) => a * b, 1);
    if (raw + rawLen > bytes.length) throw bad(`truncated in ${name}`);
    if (rawLen !== n * width) throw bad(`${name} declares shape [${dims}] but holds ${rawLen} bytes`);
    const data = new Float32Array(n);
    for (let i = 0; i < n; i++) {
      data[i] = width === 4 ? view.getFloat32(raw + 4 * i, true) : halfToFloat(view.getUint16(raw + 2 * i, true));
    }
    out[name] = { dtype, dims, data };
  }
  return out;
}

// -- float16 ------------------------------------------------------------------------------------
const f32 = new Float32Array(1), u32view = new Uint32Array(f32.buffer);

export function halfToFloat(h) {
  const sign = h & 0x8000 ? -1 : 1, exp = (h >> 10) & 0x1f, frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

export function floatToHalf(value) {  // round to nearest even, as numpy's astype(float16)
  f32[0] = value;
  const x = u32view[0], sign = (x >>> 16) & 0x8000, exp = (x >>> 23) & 0xff, mant = x & 0x7fffff;
  if (exp === 255) return sign | 0x7c00 | (mant ? 0x200 : 0);
  const e = exp - 127 + 15;
  if (e >= 31) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    const m = mant | 0x800000, shift = 14 - e, half = m >>> shift, rest = m & ((1 << shift) - 1), mid = 1 << (shift - 1);
    return sign | (half + (rest > mid || (rest === mid && (half & 1)) ? 1 : 0));
  }
  const half = (e << 10) | (mant >>> 13), rest = mant & 0x1fff;
  return sign | (half + (rest > 0x1000 || (rest === 0x1000 && (half & 1)) ? 1 : 0));
}

function toFloat32(tensor) {
  if (tensor.type === "float32") return tensor.data;
  if (tensor.type === "float16") {
    const d = tensor.data, out = new Float32Array(d.length);
    if (d instanceof Uint16Array) for (let i = 0; i < d.length; i++) out[i] = halfToFloat(d[i]);
    else out.set(d);
    return out;
  }
  throw new IA3Error(`the model returned ${tensor.type} logits; expected float32 or float16`);
}

// -- sampling -----------------------------------------------------------------------------------
function mulberry32(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function argmax(row) {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i] > row[best]) best = i;
  return best;
}

/** Sampling distribution after temperature then top-p (the order of transformers' warpers and of
 * ia3_export.runtime.generation.TokenChooser): the top logit first, so any temperature > 0 stays finite. */
export function probabilities(row, temperature, topP) {
  const top = row[argmax(row)];
  const p = new Float64Array(row.length);
  let sum = 0;
  for (let i = 0; i < row.length; i++) { p[i] = Math.exp((row[i] - top) / temperature); sum += p[i]; }
  for (let i = 0; i < p.length; i++) p[i] /= sum;
  if (topP < 1) {
    const order = Array.from(p.keys()).sort((a, b) => p[b] - p[a] || a - b);
    let before = 0, kept = 0;
    for (const i of order) {
      const drop = before >= topP;  // never the top token
      before += p[i];
      if (drop) p[i] = 0; else kept += p[i];
    }
    for (let i = 0; i < p.length; i++) p[i] /= kept;
  }
  return p;
}

/** row (logits) -> token id: argmax when temperature is 0, else a draw from `probabilities`, seeded. */
export function chooser(temperature, topP = 1, seed = 0) {
  if (temperature === 0) return argmax;
  const random = mulberry32(seed);
  return (row) => {
    const p = probabilities(row, temperature, topP);
    let r = random(), last = 0;
    for (let i = 0; i < p.length; i++) {
      if (p[i] > 0) { last = i; r -= p[i]; if (r < 0) return i; }
    }
    return last;  // rounding left r >= 0: the last token with any probability
  };
}

// -- the model ----------------------------------------------------------------------------------
export class IA3Model {
  /** Open an exported folder. ort: onnxruntime-node or onnxruntime-web; source: folder path (Node),
   * URL base (fetch) or { read(relativePath) -> Uint8Array }; options: { tokenizer, sessionOptions }. */
  static async open(ort, source, { tokenizer = null, sessionOptions = {} } = {}) {
    const read = reader(source);
    const manifest = await readJson(read, "ia3_export.json");
    if (manifest.format !== "ia3-export" || manifest.format_version !== 1) {
      throw new IA3Error("ia3_export.json is not an ia3-export manifest of format_version 1; re-export the model");
    }
    const graph = manifest.graphs?.model;
    if (!graph) {
      throw new IA3Error(`the export's graphs are ${Object.keys(manifest.graphs || {}).join(", ")}; this module runs decoder exports (model.onnx)`);
    }
    if (graph.external_data) {
      throw new IA3Error(`${graph.file} keeps its weights in ${graph.external_data}; this module reads single-file graphs (under 2 GB)`);
    }
    const vectors = (manifest.vectors || []).filter((v) => v.graph === "model");
    let bytes = await read(graph.file);
    if (vectors.length) bytes = dropInitializers(bytes, vectors.map((v) => v.name));
    let session;
    try {
      session = await ort.InferenceSession.create(bytes, sessionOptions);
    } catch (e) {
      throw new IA3Error(`${graph.file}: ONNX Runtime cannot load it (${String(e.message).split("\n")[0]})`);
    }
    const model = new IA3Model(ort, read, manifest, session, tokenizer, vectors,
      await readJson(read, "config.json", true), await readJson(read, "generation_config.json", true));
    if (model.mode === "bank") {
      for (const a of manifest.adapters || []) if (a.file) await model.loadAdapter(a.name);
    }
    return model;
  }

  constructor(ort, read, manifest, session, tokenizer, vectors, config, generationConfig) {
    this.ort = ort;
    this._read = read;
    this.manifest = manifest;
    this.session = session;
    this.tokenizer = tokenizer;
    this.vectors = vectors;
    this.config = config;
    this.generationConfig = generationConfig;
    this._inputs = new Set(session.inputNames);
    for (const v of vectors) {
      if (!this._inputs.has(v.name)) throw new IA3Error(`model.onnx has no input ${v.name} (the manifest lists it); re-export the model`);
    }
    this._float = manifest.dtype === "fp16" ? "float16" : "float32";
    this._loaded = new Map();  // name -> { name -> Float32Array [dim] }
    this._feeds = new Map();   // name -> the vector tensors fed for it
    this._identity = this._tensors(Object.fromEntries(vectors.map((v) => [v.name, new Float32Array(v.dim).fill(1)])));
    this.active = null;
  }

  get mode() { return this.manifest.mode; }
  get adapters() { return [...this._loaded.keys()]; }

  /** Load an adapter: bytes of an .onnx_adapter file, a path relative to the source, or nothing (the
   * file the export ships under that name). Its vectors are checked against the manifest first. */
  async loadAdapter(name, fileSourceOrBytes = null) {
    const start = now();
    if (!this.vectors.length) throw new IA3Error(`this is a ${this.mode} export without vector inputs; adapters cannot be loaded`);
    if (typeof name !== "string" || !/^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/.test(name) || name.includes("..")) {
      throw new IA3Error(`adapter name ${JSON.stringify(name)} is not allowed; use letters, digits, '_', '-' and '.' (not first, no '..')`);
    }
    let bytes = fileSourceOrBytes;
    if (bytes === null || bytes === undefined) {
      const shipped = (this.manifest.adapters || []).find((a) => a.name === name && a.file);
      if (!shipped) {
        const names = (this.manifest.adapters || []).filter((a) => a.file).map((a) => a.name).join(", ") || "none";
        throw new IA3Error(`adapter ${name} is not shipped in the export (shipped: ${names}); pass its .onnx_adapter bytes`);
      }
      bytes = await this._read(shipped.file);
    } else if (typeof bytes === "string") {
      bytes = await this._read(bytes);
    } else if (bytes instanceof ArrayBuffer) {
      bytes = new Uint8Array(bytes);
    }
    const limit = this.vectors.reduce((n, v) => n + 8 * v.dim + v.name.length + 256, 4096);
    if (bytes.length > limit) {
      throw new IA3Error(`adapter ${name}: ${bytes.length} bytes, more than the ${limit} an adapter for this model can need; is it another model's?`);
    }
    const values = this.checkVectors(parseOnnxAdapter(bytes, `adapter ${name}`), `adapter ${name}`);
    this._loaded.set(name, values);
    this._feeds.set(name, this._tensors(values));
    return { name, bytes: bytes.length, ms: now() - start };
  }

  /** name -> Float32Array [dim] for every vector (ones where the file sets none), after checking each
   * name, size and value against the manifest. */
  checkVectors(params, where) {
    const specs = new Map(this.vectors.map((v) => [v.name, v]));
    const out = {};
    for (const [name, p] of Object.entries(params)) {
      const spec = specs.get(name);
      if (!spec) {
        throw new IA3Error(`${where}: ${name} is not a vector input of this export (it takes e.g. ${this.vectors[0].name}); the adapter was trained with other target_modules or for another model`);
      }
      const size = p.dims.reduce((a, b) => a * b, 1);
      if (size !== spec.dim || (p.dims.length > 1 && Math.max(...p.dims) !== size)) {
        throw new IA3Error(`${where}: ${name} has shape [${p.dims}] but the export expects ${spec.dim} values; the adapter was trained for another model`);
      }
      const bad = p.data.findIndex((x) => !Number.isFinite(x) || (this._float === "float16" && Math.abs(x) > 65504));
      if (bad >= 0) throw new IA3Error(`${where}: ${name} holds ${p.data[bad]} at ${bad}; a vector must be finite in the model's dtype`);
      out[name] = p.data;
    }
    for (const v of this.vectors) if (!(v.name in out)) out[v.name] = new Float32Array(v.dim).fill(1);
    return out;
  }

  _tensors(values) {
    const feeds = {};
    for (const v of this.vectors) {
      const data = this._float === "float16" ? Uint16Array.from(values[v.name], floatToHalf) : Float32Array.from(values[v.name]);
      feeds[v.name] = new this.ort.Tensor(this._float, data, this.mode === "bank" ? [1, v.dim] : [v.dim]);
    }
    return feeds;
  }

  /** The loaded vectors of an adapter (name -> Float32Array), as they are fed. */
  adapterVectors(name) {
    this._require(name);
    return this._loaded.get(name);
  }

  _require(name) {
    if (name !== null && !this._loaded.has(name)) {
      if (!this.vectors.length) throw new IA3Error(`this is a ${this.mode} export; it has no adapters to use`);
      throw new IA3Error(`adapter ${name} is not loaded (loaded: ${this.adapters.join(", ") || "none"}); load it with loadAdapter first`);
    }
  }

  /** Switch the adapter the next runs use (null: the base model); returns the milliseconds it took. */
  useAdapter(name) {
    const start = now();
    this._require(name);
    this.active = name;
    return now() - start;
  }

  /** One run with the active adapter's vectors added to `feeds` (name -> ort.Tensor). Bank exports:
   * `rows` names an adapter per batch row (null: the base model); the banks are stacked for the run. */
  async run(feeds, rows = null) {
    const all = { ...feeds, ...this._adapterFeeds(feeds.input_ids.dims[0], rows) };
    for (const name of Object.keys(all)) {
      // onnxruntime-node drops a feed it does not know without a word: never let that happen
      if (!this._inputs.has(name)) throw new IA3Error(`the model has no input ${name}; it takes ${this.session.inputNames.join(", ")}`);
    }
    try {
      return await this.session.run(all);
    } catch (e) {
      throw new IA3Error(`ONNX Runtime failed to run the model: ${String(e.message).split("\n")[0]}`);
    }
  }

  _adapterFeeds(batch, rows) {
    const names = rows || Array(batch).fill(this.active);
    names.forEach((n) => this._require(n));
    if (!this.vectors.length) return {};
    if (this.mode !== "bank") {
      if (new Set(names).size > 1) throw new IA3Error(`a ${this.mode} export runs one adapter per run; use a bank export to mix them per row`);
      return names[0] === null ? this._identity : this._feeds.get(names[0]);
    }
    const distinct = [...new Set(names)];
    if (distinct.length === 1) {  // one adapter for the batch: its 1-row banks, every row on row 0
      const ids = new this.ort.Tensor("int64", new BigInt64Array(batch), [batch]);
      return { [ADAPTER_IDS]: ids, ...(distinct[0] === null ? this._identity : this._feeds.get(distinct[0])) };
    }
    const feeds = {
      [ADAPTER_IDS]: new this.ort.Tensor("int64", BigInt64Array.from(names, (n) => BigInt(distinct.indexOf(n))), [batch]),
    };
    for (const v of this.vectors) {
      const rowsData = distinct.map((n) => (n === null ? this._identity : this._feeds.get(n))[v.name].data);
      const data = new rowsData[0].constructor(distinct.length * v.dim);
      rowsData.forEach((d, i) => data.set(d, i * v.dim));
      feeds[v.name] = new this.ort.Tensor(this._float, data, [distinct.length, v.dim]);
    }
    return feeds;
  }

  _emptyCache(batch) {
    const cache = this.manifest.cache;
    if (!cache || (cache.kv_layout && cache.kv_layout !== "concat")) {
      throw new IA3Error(`this export's KV cache layout is ${cache?.kv_layout || "none"}; this module runs decoder exports with the concat KV cache (export without --graph fused)`);
    }
    const feeds = {};
    for (const name of this.session.inputNames) {
      if (name.startsWith(PAST)) {
        feeds[name] = new this.ort.Tensor(this._float, this._float === "float16" ? new Uint16Array(0) : new Float32Array(0),
          [batch, cache.num_kv_heads, 0, cache.head_dim]);
      }
    }
    return feeds;
  }

  _prefill(ids) {
    const n = ids.length;
    const int64 = (values) => new this.ort.Tensor("int64", BigInt64Array.from(values, BigInt), [1, values.length]);
    return {
      input_ids: int64(ids),
      attention_mask: int64(Array(n).fill(1)),
      ...(this._inputs.has("position_ids") ? { position_ids: int64(ids.map((_, i) => i)) } : {}),
      ...this._emptyCache(1),
    };
  }

  /** One full-sequence run (no past) with the active adapter: { data: Float32Array, dims: [1, len, vocab] }. */
  async logits(inputIds) {
    const ids = Array.from(inputIds, Number);
    if (!ids.length) throw new IA3Error("logits needs at least one token");
    const out = await this.run(this._prefill(ids));
    return { data: toFloat32(out.logits), dims: out.logits.dims.map(Number) };
  }

  _eos() {
    let eos = this.generationConfig.eos_token_id ?? this.manifest.tokens?.eos;
    if (eos === null || eos === undefined) return new Set();
    return new Set(Array.isArray(eos) ? eos : [eos]);
  }

  /** Generate from a prompt (text, with the tokenizer; or token ids) with the active adapter and the KV
   * cache: greedy when temperature is 0, else sampled (temperature, topP, seed). onToken(id, textPiece)
   * is called for each token as it is chosen; a piece never splits a character (it is "" until it can
   * be shown). -> { tokens, text, ms, firstTokenMs } */
  async generate(prompt, { maxNewTokens = 32, temperature = 0, topP = 1, seed = 0, onToken = null } = {}) {
    const start = now();
    if (!Number.isInteger(maxNewTokens) || maxNewTokens < 1) throw new IA3Error(`maxNewTokens must be an integer >= 1, got ${maxNewTokens}`);
    if (!(Number.isFinite(temperature) && temperature >= 0)) throw new IA3Error(`temperature must be a finite number >= 0 (0: greedy), got ${temperature}`);
    if (!(topP > 0 && topP <= 1)) throw new IA3Error(`topP must be a number in (0, 1], got ${topP}`);
    if (!Number.isInteger(seed) || seed < 0) throw new IA3Error(`seed must be an integer >= 0, got ${seed}`);
    let ids;
    if (typeof prompt === "string") {
      if (!this.tokenizer) throw new IA3Error("a text prompt needs a tokenizer (pass { tokenizer } to IA3Model.open), or pass token ids");
      const encoded = this.tokenizer.encode(prompt);  // transformers.js: ids; @huggingface/tokenizers: { ids }
      ids = Array.from(Array.isArray(encoded) ? encoded : encoded.ids, Number);
    } else {
      ids = Array.from(prompt, Number);
    }
    if (!ids.length) throw new IA3Error("the prompt has no tokens");
    const sizes = this.config.text_config || this.config;  // as runtime/folder.py:max_positions
    const limit = sizes.max_position_embeddings ?? sizes.n_positions;
    if (limit !== undefined) {
      if (ids.length >= limit) throw new IA3Error(`the prompt has ${ids.length} tokens; the model takes at most ${limit} positions for prompt and new tokens together`);
      maxNewTokens = Math.min(maxNewTokens, limit - ids.length);
    }
    const eos = this._eos();
    const choose = chooser(temperature, topP, seed);
    const tokens = [];
    let shown = 0, firstTokenMs = null;
    const emit = (token) => {
      tokens.push(token);
      firstTokenMs ??= now() - start;
      if (!onToken) return;
      let piece = "";
      if (this.tokenizer) {
        const text = this.tokenizer.decode(tokens, { skip_special_tokens: true });
        if (!text.endsWith("\ufffd")) { piece = text.slice(shown); shown = text.length; }
      }
      onToken(token, piece);
    };
    let feeds = this._prefill(ids);
    let out = await this.run(feeds);
    const names = this.session.outputNames.filter((n) => n.startsWith(PRESENT));
    for (let step = 0; ; step++) {
      const [, len, vocab] = out.logits.dims.map(Number);
      const token = choose(toFloat32(out.logits).subarray((len - 1) * vocab, len * vocab));
      emit(token);
      if (eos.has(token) || step + 1 >= maxNewTokens) break;
      const total = ids.length + tokens.length;
      feeds = {
        input_ids: new this.ort.Tensor("int64", BigInt64Array.of(BigInt(token)), [1, 1]),
        attention_mask: new this.ort.Tensor("int64", new BigInt64Array(total).fill(1n), [1, total]),
        ...(this._inputs.has("position_ids") ? { position_ids: new this.ort.Tensor("int64", BigInt64Array.of(BigInt(total - 1)), [1, 1]) } : {}),
      };
      for (const n of names) feeds[PAST + n.slice(PRESENT.length)] = out[n];
      out = await this.run(feeds);
    }
    const text = this.tokenizer ? this.tokenizer.decode(tokens, { skip_special_tokens: true }) : null;
    return { tokens, text, ms: now() - start, firstTokenMs };
  }

  async release() {
    await this.session.release();
  }
}

function now() {
  return typeof performance !== "undefined" ? performance.now() : Date.now();
}
