"""``trimformer distill``: retrain a smaller student from a teacher before export."""

from __future__ import annotations

import os

import click

from trimformer.cli.main import State, emit, pass_state
from trimformer.cli.options import apply_options, input_argument, training_options

_student_options = apply_options(
    click.option(
        "--layers", help="Layer-dropped student: a count (3, evenly spaced) or teacher layers (0,2,4)."
    ),
    click.option(
        "--from-pruning", help="Pruned student: a pruning_record.json or the pruned artifact folder."
    ),
    click.option("--student", help="Start from this model folder (same vocabulary and labels)."),
    click.option("--student-layers", type=int, help="Random student of this shape: layers ..."),
    click.option("--student-hidden", type=int, help="... hidden size ..."),
    click.option("--student-heads", type=int, help="... attention heads ..."),
    click.option("--student-ffn", type=int, help="... and feed-forward size."),
)

_loss_options = apply_options(
    click.option("--temperature", type=float, default=2.0, help="Softmax temperature of the soft targets."),
    click.option(
        "--alpha",
        type=float,
        default=0.5,
        help="Weight of the soft-target loss; cross-entropy on labels gets 1 - alpha.",
    ),
    click.option("--hidden-weight", type=float, default=0.0, help="Weight of the hidden-state MSE."),
    click.option("--attention-weight", type=float, default=0.0, help="Weight of the attention KL."),
    click.option(
        "--embedding-loss",
        type=click.Choice(["cosine", "mse"]),
        default="cosine",
        help="Output loss for feature-extraction models.",
    ),
    click.option(
        "--train-embeddings/--freeze-embeddings",
        default=None,
        help="Train the word embeddings [default: frozen when the student starts from the teacher's weights].",
    ),
    click.option("--ignore-labels", is_flag=True, help="Pure distillation: use the data's texts only."),
)

_schedule_options = apply_options(
    click.option("--grad-accum", type=int, default=1, help="Micro-batches per optimizer step."),
    click.option("--weight-decay", type=float, default=0.01),
    click.option("--eval-limit", type=int, default=2000, help="Dev rows to evaluate on."),
    click.option(
        "--group-by-length/--no-group-by-length",
        default=True,
        help="Batch texts of similar length together (less padding, faster on CPU).",
    ),
    click.option(
        "--time-limit",
        type=float,
        help="Stop after this many seconds of training, keeping the best dev weights so far.",
    ),
)

_checkpoint_options = apply_options(
    click.option("--save-every", type=int, help="Checkpoint every N steps [default: --eval-every]."),
    click.option("--checkpoint-dir", type=click.Path(), help="Checkpoint folder [default: OUT.ckpt]."),
    click.option("--resume/--no-resume", default=True, help="Continue from a checkpoint if one is there."),
    click.option("--keep-checkpoint", is_flag=True, help="Keep the checkpoint after a finished run."),
)

_device_options = apply_options(
    click.option(
        "--nproc-per-node",
        type=int,
        default=1,
        help="Processes on this machine (DistributedDataParallel under torchrun).",
    ),
    click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto"),
    click.option("--threads", type=int, help="PyTorch threads per process [default: all cores]."),
)

_qat_options = apply_options(
    click.option(
        "--qat",
        is_flag=True,
        help="Quantization-aware training: int8 fake-quantization of the student's encoder "
        "(then `trimformer quantize --ranges-from-training`).",
    ),
    click.option(
        "--qat-steps",
        type=int,
        default=0,
        help="With --qat: fake-quantize only the last N steps (0: all steps).",
    ),
    click.option(
        "--qat-ranges",
        type=click.Choice(["ema", "learned"]),
        default="ema",
        help="With --qat: activation ranges observed (moving min/max) or learned.",
    ),
)


# Every default is shown in --help; options without one say in their help what happens instead.
@click.command("distill", context_settings={"show_default": True})
@input_argument("teacher", "--teacher", "--model", help="Trained model folder (Hugging Face or plain).")
@click.option(
    "--data",
    required=True,
    help="Texts to distil on (.csv, .tsv, .jsonl or builtin:tweets); labels optional.",
)
@click.option("--out", required=True, type=click.Path(), help="Folder for the student.")
@_student_options
@_loss_options
@training_options(steps=1000, lr=1e-4, eval_every=200, batch_help="Rows per micro-batch and process.")
@_schedule_options
@_checkpoint_options
@_device_options
@_qat_options
@pass_state
def distill_command(state: State, **kwargs: object) -> None:
    """Distil TEACHER into a smaller student that `trimformer export` takes.

    \b
    Examples:
      trimformer distill work/teacher --data builtin:tweets --out work/student --layers 3
      trimformer distill work/teacher --data builtin:tweets --out work/recovered \\
          --from-pruning work/pruned-onnx --steps 600
      trimformer distill work/teacher --data builtin:tweets --out work/student \\
          --layers 0,2,4 --nproc-per-node 2
      trimformer distill work/teacher --data builtin:tweets --out work/qat-student \\
          --layers 3 --qat --qat-steps 300
    """
    from trimformer.training.distill.api import DistillConfig, distill

    result = distill(DistillConfig(**kwargs))  # type: ignore[arg-type]
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun only rank 0 reports
    share = result.parameters / max(result.teacher_parameters, 1)
    emit(
        state,
        result.to_dict(),
        f"distilled a {result.student['kind']} student ({result.parameters / 1e6:.1f} M parameters, "
        f"{share:.0%} of the teacher) in {result.seconds:.0f} s; best dev {result.metric} "
        f"{result.best_dev_score:.4f} at step {result.best_step} (teacher {result.teacher_dev_score:.4f}); "
        f"saved to {result.out}" + (" with its QAT ranges (qat_ranges.json)" if kwargs.get("qat") else ""),
    )
