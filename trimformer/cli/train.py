"""``trimformer train``: fine-tune a teacher, or train a causal language model."""

from __future__ import annotations

import click

from trimformer.cli.main import State, emit, pass_state
from trimformer.cli.options import input_argument, training_options
from trimformer.errors import UserError
from trimformer.formats.tasks import CAUSAL_LM, SEQUENCE_CLASSIFICATION

# What a causal-LM run uses where the command line leaves a shared option at its classifier
# default: a model trained from scratch wants more steps, a higher rate and longer blocks.
LM_DEFAULTS = {"steps": 700, "lr": 1e-3, "batch_size": 16, "max_length": 128, "warmup": 0.05}


@click.command("train")
@input_argument(
    "model",
    "--model",
    help="Hugging Face or plain model folder, or builtin:minilm; optional with --task causal-lm "
    "(then a new Llama-layout model and tokenizer are trained).",
    optional=True,
)
@click.option(
    "--task",
    type=click.Choice([SEQUENCE_CLASSIFICATION, CAUSAL_LM]),
    default=SEQUENCE_CLASSIFICATION,
    show_default=True,
    help="A text classifier, or a causal language model on the texts alone.",
)
@click.option("--data", required=True, help="Dataset: .csv, .tsv, .jsonl or builtin:tweets.")
@click.option("--out", required=True, type=click.Path(), help="Folder for the trained model.")
@click.option("--epochs", type=float, default=None, help="Train for epochs instead of --steps (classifiers).")
@click.option(
    "--vocab-size", type=int, default=4096, show_default=True, help="Tokenizer size of a new causal LM."
)
@training_options(steps=500, lr=5e-5, eval_every=100)
@pass_state
def train_command(state: State, model: str | None, task: str, vocab_size: int, **kwargs: object) -> None:
    """Fine-tune MODEL into a text classifier on --data (best dev checkpoint kept), or, with
    --task causal-lm, train a causal language model on its texts (resumes an interrupted run).

    \b
    Examples:
      trimformer train builtin:minilm --data builtin:tweets --out work/teacher
      trimformer train --task causal-lm --data builtin:tweets --out work/lm
    """
    if task == CAUSAL_LM:
        _train_lm(state, model, vocab_size, kwargs)
        return
    if model is None:
        raise UserError("missing MODEL: give it as the first argument or with --model")
    from trimformer.training.finetune import TrainConfig, train

    result = train(TrainConfig(model=model, **kwargs))  # type: ignore[arg-type]
    emit(
        state,
        result.to_dict(),
        f"trained {result.steps} steps in {result.seconds:.0f} s; best dev accuracy "
        f"{result.best_dev_accuracy:.4f} at step {result.best_step}; saved to {result.out}",
    )


def _train_lm(state: State, model: str | None, vocab_size: int, options: dict[str, object]) -> None:
    ctx = click.get_current_context()
    if options.pop("epochs") is not None:
        raise UserError("--epochs is for classifiers; give a causal LM --steps")
    if options.pop("text_pair_column") is not None or options.pop("label_column") is not None:
        raise UserError("a causal LM trains on one text column; drop --text-pair-column/--label-column")
    for key, value in LM_DEFAULTS.items():
        if ctx.get_parameter_source(key) is click.core.ParameterSource.DEFAULT:
            options[key] = value
    from trimformer.training.lm import LMConfig, train_causal_lm

    result = train_causal_lm(LMConfig(model=model, vocab_size=vocab_size, **options))  # type: ignore[arg-type]
    emit(
        state,
        result.to_dict(),
        f"trained {result.steps} steps in {result.seconds:.0f} s ({result.parameters / 1e6:.1f} M parameters); "
        f"dev perplexity {result.dev_perplexity:.1f} at step {result.best_step} (unigram model "
        f"{result.unigram_dev_perplexity:.1f}); saved to {result.out}",
    )
