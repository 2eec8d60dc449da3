"""`ia3-export generate ONNX_DIR --prompt TEXT`: generation on ONNX Runtime, torch-free."""
import click


@click.command("generate")
@click.argument("onnx_dir", type=click.Path())
@click.option("--prompt", required=True, multiple=True, help="Prompt text (repeat for a batch).")
@click.option("--adapter", default=None,
              help="Adapter: a name shipped in the folder, or a path (with a '/', e.g. ./my-adapter) to a PEFT "
                   "adapter folder, or an .onnx_adapter file. A bare name is always a shipped one.")
@click.option("--max-new-tokens", default=32, show_default=True, type=int,
              help="Cut to the positions the model has left after the prompt (a note on stderr says so).")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", default=1.0, show_default=True, type=float)
@click.option("--top-k", default=0, show_default=True, type=int, help="Sample from the k most likely tokens (0: all).")
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--stop", "stop_strings", multiple=True, help="Stop a prompt's text once it contains this string (repeatable).")
@click.option("--seed", default=None, type=int, help="Seed for sampling (reproducible output).")
def command(onnx_dir, prompt, adapter, max_new_tokens, provider, sample, temperature, top_k, top_p, stop_strings, seed):
    """Generate text with an exported model (merged, swappable, bank or foldswap) on ONNX Runtime.
    One prompt is printed as it is generated; several are generated as one batch, one per line."""
    import warnings

    from ..runtime import IA3Session
    from ..runtime.generation import GenerationCapped, GenerationOptions

    options = dict(max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature, top_k=top_k,
                   top_p=top_p, stop_strings=list(stop_strings) or None, seed=seed)
    GenerationOptions(**options)  # bad options fail before the model is loaded
    session = IA3Session(onnx_dir, provider=provider)
    name = session.load_adapter(adapter) if adapter else None
    session.set_adapter(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GenerationCapped)
        if len(prompt) == 1:
            pieces = session.stream(prompt[0], **options)
        else:
            texts = session.generate_batch([(p, name) for p in prompt], **options)
    for w in caught:
        click.echo(f"note: {w.message}", err=True)
    if len(prompt) == 1:
        for piece in pieces:
            click.echo(piece, nl=False)
        click.echo()
    else:
        for text in texts:
            click.echo(text)
