"""`ia3-export generate ONNX_DIR --prompt TEXT`: generation on ONNX Runtime, torch-free."""
import click


@click.command("generate")
@click.argument("onnx_dir", type=click.Path())
@click.option("--prompt", required=True, multiple=True, help="Prompt text (repeat for a batch).")
@click.option("--adapter", default=None,
              help="Adapter: a name shipped in the folder, an .onnx_adapter file or a PEFT adapter folder.")
@click.option("--max-new-tokens", default=32, show_default=True, type=int)
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", default=1.0, show_default=True, type=float)
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--seed", default=None, type=int, help="Seed for sampling (reproducible output).")
def command(onnx_dir, prompt, adapter, max_new_tokens, provider, sample, temperature, top_p, seed):
    """Generate text with an exported model (merged, swappable, bank or foldswap) on ONNX Runtime."""
    from ..runtime import IA3Session

    session = IA3Session(onnx_dir, provider=provider)
    name = session.load_adapter(adapter) if adapter else None
    session.set_adapter(name)
    texts = session.generate_batch([(p, name) for p in prompt], max_new_tokens=max_new_tokens, do_sample=sample,
                                   temperature=temperature, top_p=top_p, seed=seed)
    for text in texts:
        click.echo(text)
