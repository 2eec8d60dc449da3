"""`ia3-export generate ONNX_DIR --prompt TEXT`: generation on ONNX Runtime, torch-free."""
import click

from ..runtime.requests import (INT_MAX, MAX_TEXT_BYTES, NUMERIC_FIELDS, SAMPLING_FIELDS, SEED_MAX,
                                TOKENIZER_TIMEOUT_S, register)
from .options import FloatRange, IntRange


class LogitBias(click.ParamType):
    """`--logit-bias TOKEN_ID=BIAS` as (id, bias); the range is checked with the other options (one line)."""

    name = "TOKEN_ID=BIAS"

    def convert(self, value, param, ctx):
        from ..errors import IA3Error

        token, _, bias = str(value).partition("=")
        try:
            return int(token), float(bias)
        except ValueError:
            raise IA3Error(f"--logit-bias is {value!r}; give TOKEN_ID=BIAS, such as 50256=-100") from None


@click.command("generate")
@click.argument("onnx_dir", type=click.Path())
@click.option("--prompt", "prompts", multiple=True, help="Prompt text (repeat for a batch).")
@click.option("--prompt-file", "prompt_files", multiple=True, type=click.Path(dir_okay=False),
              help="A file whose whole content (UTF-8) is one prompt (repeatable; after the --prompt ones).")
@click.option("--adapter", default=None,
              help="Adapter: a name shipped in the folder, or a path (with a '/', e.g. ./my-adapter) to a PEFT "
                   "adapter folder, or an .onnx_adapter file. A bare name is always a shipped one.")
@click.option("--max-new-tokens", default=32, show_default=True, type=IntRange(1, INT_MAX),
              help="Cut to the positions the model has left after the prompt (a note on stderr says so).")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", default=1.0, show_default=True, type=FloatRange(0, min_open=True))
@click.option("--top-k", default=0, show_default=True, type=IntRange(0, INT_MAX),
              help="Sample from the k most likely tokens (0: all).")
@click.option("--top-p", default=1.0, show_default=True, type=FloatRange(0, 1, min_open=True))
@click.option("--min-p", default=0.0, show_default=True, type=FloatRange(0, 1),
              help="Sample only tokens at least this fraction as likely as the most likely one (0: all).")
@click.option("--repetition-penalty", default=1.0, show_default=True, type=FloatRange(0, min_open=True),
              help="transformers' penalty on tokens of the prompt and the output (1: off; above 1 repeats less).")
@click.option("--presence-penalty", default=0.0, show_default=True, type=FloatRange(-2, 2),
              help="OpenAI's: subtracted from the logit of each token the output already holds (0: off).")
@click.option("--frequency-penalty", default=0.0, show_default=True, type=FloatRange(-2, 2),
              help="OpenAI's: subtracted once per time the output already holds the token (0: off).")
@click.option("--logit-bias", "logit_bias", multiple=True, type=LogitBias(),
              help="TOKEN_ID=BIAS added to that token's logit, BIAS from -100 to 100 (repeatable).")
@click.option("--min-new-tokens", default=0, show_default=True, type=IntRange(0, INT_MAX),
              help="No EOS (nor stop string) before this many new tokens.")
@click.option("--ignore-eos", is_flag=True, help="Go on past EOS, up to --max-new-tokens or a stop string.")
@click.option("--stop", "stop_strings", multiple=True, help="Stop a prompt's text once it contains this string (repeatable).")
@click.option("--seed", default=None, type=IntRange(0, SEED_MAX), help="Seed for sampling (reproducible output).")
@click.option("--max-text-bytes", default=MAX_TEXT_BYTES, show_default=True, type=IntRange(1, INT_MAX),
              help="Most bytes (UTF-8) a prompt may hold; checked before it is tokenized.")
@click.option("--tokenizer-timeout", default=TOKENIZER_TIMEOUT_S, show_default=True, type=FloatRange(0, 3600, min_open=True),
              help="Seconds the tokenizer may spend on one prompt (it runs in a child process, stopped after that).")
def command(onnx_dir, prompts, prompt_files, adapter, max_new_tokens, provider, sample, temperature, top_k, top_p,
            min_p, repetition_penalty, presence_penalty, frequency_penalty, logit_bias, min_new_tokens, ignore_eos,
            stop_strings, seed, max_text_bytes, tokenizer_timeout):
    """Generate text with an exported model (merged, swappable, bank or foldswap) on ONNX Runtime.
    One prompt is printed as it is generated; several are generated as one batch, one per line."""
    import warnings

    from ..errors import IA3Error
    from ..formats.reader import read_text
    from ..runtime import IA3Session
    from ..runtime.generation import GenerationCapped, GenerationOptions
    from ..runtime.requests import Limits

    prompt = [*prompts, *(read_text(path, "text") for path in prompt_files)]  # a regular file, capped, UTF-8
    if not prompt:
        raise IA3Error("give a prompt: --prompt TEXT or --prompt-file PATH")
    options = dict(max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature, top_k=top_k,
                   top_p=top_p, stop_strings=list(stop_strings) or None, seed=seed, min_p=min_p,
                   repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                   frequency_penalty=frequency_penalty, logit_bias=dict(logit_bias) or None,
                   min_new_tokens=min_new_tokens, ignore_eos=ignore_eos)
    GenerationOptions(**options)  # bad options fail before the model is loaded
    session = IA3Session(onnx_dir, provider=provider,
                         limits=Limits(max_text_bytes=max_text_bytes, tokenizer_timeout_s=tokenizer_timeout))
    try:
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
    finally:
        session.close()


FLAGS = {field: "--" + field.replace("_", "-") for field in NUMERIC_FIELDS}  # each numeric option's flag


@register("cli generate", ("causal-lm", "seq2seq-lm"), tuple(FLAGS))
def _open(folder: str, limits):
    """This command as a request path (runtime/requests.py): each request is one run of the command, in
    this process, as a user types it (bytes become argv's surrogate-escaped text)."""
    import os

    from click.testing import CliRunner

    from ..errors import IA3Error
    from . import main

    def send(text, **fields) -> str:
        args = ["generate", folder, "--prompt", os.fsdecode(text) if isinstance(text, bytes) else text,
                "--max-text-bytes", str(limits.max_text_bytes), "--tokenizer-timeout", str(limits.tokenizer_timeout_s)]
        args += [a for k, v in fields.items() for a in (FLAGS[k], str(v))]
        if set(SAMPLING_FIELDS) & set(fields):
            args.append("--sample")
        result = CliRunner().invoke(main, args)
        if result.exit_code == 2 and result.stderr.startswith("error: "):
            raise IA3Error(result.stderr.strip().splitlines()[0][len("error: "):])
        if result.exit_code != 0:
            raise AssertionError(f"generate exited {result.exit_code}: {result.output[-2000:]}")
        return result.stdout.rstrip("\n")

    send.close = lambda: None
    return send
