"""``trimformer train``: fine-tune a teacher."""

from __future__ import annotations

import click

from trimformer.cli.main import State, emit, pass_state
from trimformer.cli.options import input_argument, training_options


@click.command("train")
@input_argument("model", "--model", help="Hugging Face or plain model folder, or builtin:minilm.")
@click.option("--data", required=True, help="Labelled dataset: .csv, .tsv, .jsonl or builtin:tweets.")
@click.option("--out", required=True, type=click.Path(), help="Folder for the fine-tuned model.")
@click.option("--epochs", type=float, default=None, help="Train for epochs instead of --steps.")
@training_options(steps=500, lr=5e-5, eval_every=100)
@pass_state
def train_command(state: State, **kwargs: object) -> None:
    """Fine-tune MODEL into a text classifier on --data; keeps the best dev checkpoint.

    \b
    Example:
      trimformer train builtin:minilm --data builtin:tweets --out work/teacher
    """
    from trimformer.training.finetune import TrainConfig, train

    result = train(TrainConfig(**kwargs))  # type: ignore[arg-type]
    emit(
        state,
        result.to_dict(),
        f"trained {result.steps} steps in {result.seconds:.0f} s; best dev accuracy "
        f"{result.best_dev_accuracy:.4f} at step {result.best_step}; saved to {result.out}",
    )
