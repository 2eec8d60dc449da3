// node tjs_features.mjs MODELS_ROOT NAME TEXTS_JSON
// Loads MODELS_ROOT/NAME with transformers.js' pipeline("feature-extraction"), offline, and prints one JSON
// line: per text its token ids and the model's last_hidden_state (no pooling), [tokens][hidden].
import { localPipeline } from './tjs_load.mjs';

const [root, name, textsJson] = process.argv.slice(2);
const extractor = await localPipeline('feature-extraction', root, name);
const rows = [];
for (const text of JSON.parse(textsJson)) {
    const output = await extractor(text);
    rows.push({ input_ids: Array.from(extractor.tokenizer(text).input_ids.data, Number), hidden: output.tolist()[0] });
}
console.log(JSON.stringify({ rows }));
