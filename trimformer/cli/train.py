"""``trimformer train``: fine-tune a teacher."""

from __future__ import annotations

import click

from trimformer.cli.main import State, emit, pass_state
from trimformer.cli.options import data_columns, overwrite_option


@click.command("train")
@click.option("--model", required=True, help="Hugging Face or plain model folder, or builtin:minilm.")
@click.option("--data", required=True, help="Labelled dataset: .csv, .tsv, .jsonl or builtin:tweets.")
@click.option("--out", required=True, type=click.Path(), help="Folder for the fine-tuned model.")
@click.option("--steps", type=int, default=500, show_default=True, help="Optimizer steps.")
@click.option("--epochs", type=float, default=None, help="Train for epochs instead of --steps.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--max-length", type=int, default=64, show_default=True, help="Tokens per text.")
@click.option("--lr", type=float, default=5e-5, show_default=True, help="Peak learning rate.")
@click.option("--warmup", type=float, default=0.1, show_default=True, help="Warm-up fraction of the steps.")
@click.option(
    "--eval-every", type=int, default=100, show_default=True, help="Evaluate on the dev split every N steps."
)
@click.option("--seed", type=int, default=0, show_default=True)
@data_columns
@overwrite_option
@pass_state
def train_command(state: State, **kwargs: object) -> None:
    """Fine-tune a Transformer classifier; keeps the best dev checkpoint.

    \b
    Example:
      trimformer train --model builtin:minilm --data builtin:tweets --out work/teacher
    """
    from trimformer.training.finetune import TrainConfig, train

    result = train(TrainConfig(**kwargs))  # type: ignore[arg-type]
    emit(
        state,
        result.to_dict(),
        f"trained {result.steps} steps in {result.seconds:.0f} s; best dev accuracy "
        f"{result.best_dev_accuracy:.4f} at step {result.best_step}; saved to {result.out}",
    )
