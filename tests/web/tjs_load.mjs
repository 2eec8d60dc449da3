// What every tjs_*.mjs script does first, as docs/web.md shows users: transformers.js' pipeline on a
// folder under `root` (env.localModelPath), offline (no remote models, local files only).
import { pipeline, env } from '@huggingface/transformers';

export function localPipeline(task, root, name, options = {}) {
    env.allowRemoteModels = false;
    env.localModelPath = root;
    return pipeline(task, name, { local_files_only: true, ...options });
}
