// node tjs_classify.mjs MODELS_ROOT NAME TEXTS_JSON
// Loads MODELS_ROOT/NAME with transformers.js' pipeline("text-classification"), offline, and prints one
// JSON line: every label with its score for each text (top_k: null), and the id2label it read.
import { localPipeline } from './tjs_load.mjs';

const [root, name, textsJson] = process.argv.slice(2);
const classifier = await localPipeline('text-classification', root, name);
const rows = [];
for (const text of JSON.parse(textsJson)) {
    rows.push(await classifier(text, { top_k: null }));
}
console.log(JSON.stringify({ rows, id2label: classifier.model.config.id2label }));
