"""``trimformer generate``: text from a causal-LM artifact or bundle."""

from __future__ import annotations

import sys

import click

from trimformer.cli.main import State, emit, pass_state
from trimformer.cli.options import model_argument


@click.command("generate")
@model_argument(help="Causal-LM artifact folder, or a bundle folder or .tar.gz.")
@click.option("--prompt", "prompts", multiple=True, required=True, help="Prompt text; repeat for a batch.")
@click.option("--max-new-tokens", type=int, default=None, help="[default: the model's, else 64]")
@click.option(
    "--temperature",
    type=float,
    default=None,
    help="0: greedy; more: sampling. [default: the model's, else 0]",
)
@click.option(
    "--top-k",
    type=int,
    default=None,
    help="Sample from the k likeliest (0: all). [default: the model's, else 0]",
)
@click.option(
    "--top-p",
    type=float,
    default=None,
    help="Nucleus sampling mass, in (0, 1]. [default: the model's, else 1]",
)
@click.option("--repetition-penalty", type=float, default=None, help="[default: the model's, else 1]")
@click.option(
    "--stop", "stop_strings", multiple=True, help="Stop at this text (cut from the output); repeatable."
)
@click.option("--seed", type=int, default=None, help="Seed for reproducible sampling.")
@click.option("--stream", is_flag=True, help="Print text as it is generated (one prompt).")
@click.option("--provider", default="cpu", show_default=True)
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads [default: all cores].")
@pass_state
def generate_command(
    state: State,
    model: str,
    prompts: tuple[str, ...],
    stream: bool,
    provider: str,
    threads: int | None,
    stop_strings: tuple[str, ...],
    **settings: object,
) -> None:
    """Continue each --prompt with MODEL (a causal LM), keeping its KV cache between steps.

    \b
    Example:
      trimformer generate work/lm-onnx --prompt "the weather today is" --max-new-tokens 32
    """
    from trimformer.errors import UserError
    from trimformer.runtime.generator import GenerationSettings, Generator

    # Given options override the model's own defaults (a bundle's generation settings, or the
    # artifact's generation_config.json); they are checked before the model is loaded.
    given = {key: value for key, value in settings.items() if value is not None}
    if stop_strings:
        given["stop_strings"] = list(stop_strings)
    GenerationSettings.from_dict(given, "options")
    if stream and len(prompts) > 1:
        raise UserError("--stream prints one prompt's text as it comes; give one --prompt")
    generator = Generator(model, provider=provider, threads=threads)
    generation = GenerationSettings.from_dict({**generator.default_settings.to_dict(), **given}, "options")

    def write(_: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if stream and not state.json:
        sys.stdout.write(prompts[0])
    results = generator.generate(
        list(prompts), generation, on_text=write if stream and not state.json else None
    )
    if stream and not state.json:
        sys.stdout.write("\n")
        return
    payload = {
        "generations": [
            {
                "prompt": r.prompt,
                "text": r.text,
                "tokens": len(r.token_ids),
                "finish_reason": r.finish_reason,
                "prompt_tokens": r.prompt_tokens,
            }
            for r in results
        ]
    }
    emit(state, payload, "\n".join(f"{r.prompt}{r.text}" for r in results))
