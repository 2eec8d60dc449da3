// node tjs_generate.mjs MODELS_ROOT NAME MAX_NEW_TOKENS PROMPTS_JSON [DTYPE]
// Loads MODELS_ROOT/NAME with transformers.js' pipeline("text-generation"), offline, and prints one JSON
// line: per prompt the greedy text (pipeline), the prompt's and the new token ids (model.generate) and
// the prompt's last-position logits (one forward pass). DTYPE (optional) overrides config.json's
// transformers.js_config.dtype, as a user's `dtype` option would.
import { localPipeline } from './tjs_load.mjs';

const [root, name, maxNewTokens, promptsJson, dtype] = process.argv.slice(2);
const generator = await localPipeline('text-generation', root, name, dtype ? { dtype } : {});
const max_new_tokens = Number(maxNewTokens);
const rows = [];
for (const prompt of JSON.parse(promptsJson)) {
    const [{ generated_text: text }] = await generator(prompt, { do_sample: false, max_new_tokens, return_full_text: false });
    const inputs = generator.tokenizer(prompt);
    const promptIds = Array.from(inputs.input_ids.data, Number);
    const sequence = await generator.model.generate({ ...inputs, do_sample: false, max_new_tokens });
    const newIds = Array.from(sequence.data, Number).slice(promptIds.length);
    const { logits } = await generator.model(inputs);
    const data = (logits.type === 'float16' ? logits.to('float32') : logits).data; // Node 20 has no Float16Array
    const vocab = logits.dims.at(-1);
    const lastLogits = Array.from(data.slice(data.length - vocab));
    rows.push({ prompt, text, prompt_ids: promptIds, new_ids: newIds, last_logits: lastLogits });
}
console.log(JSON.stringify({ rows }));
