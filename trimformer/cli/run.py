"""``trimformer run``: every stage of a recipe, cached, resumable, with a report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from trimformer.cli.main import State, emit, pass_state
from trimformer.errors import GateFailed

_WORDS = {"cached": "cached", "start": "running", "done": "done", "failed": "failed", "skip": "skipped"}


def _default_workdir(recipe: str) -> str:
    return str(Path("work") / "runs" / Path(recipe).stem)


@click.command("run")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option(
    "--workdir", default=None, type=click.Path(), help="Cache and outputs [default: work/runs/RECIPE-NAME]."
)
@click.option(
    "--from", "from_stage", default=None, help="Rerun from this stage on (earlier ones come from the cache)."
)
@click.option("--until", default=None, help="Stop after this stage.")
@click.option("--force", is_flag=True, help="Rerun every stage even when cached.")
@click.option("--dry-run", is_flag=True, help="Print the plan and what is cached; run nothing.")
@pass_state
def run_command(
    state: State,
    recipe: str,
    workdir: str | None,
    from_stage: str | None,
    until: str | None,
    force: bool,
    dry_run: bool,
) -> None:
    """Run RECIPE (a TOML file): train, distill, export, passes, validate, package.

    Each stage is cached under a hash of its parameters and inputs, so a rerun skips what is
    done and an interrupted run resumes where it stopped. Exit 1 when a validation gate fails.

    \b
    Example:
      trimformer run recipes/edge-cpu.toml --workdir work/edge
      trimformer run recipes/edge-cpu.toml --workdir work/edge --from quantize
    """
    from trimformer.pipeline.recipe import load_recipe
    from trimformer.pipeline.runner import StageEvent, run_recipe

    parsed = load_recipe(recipe)
    folder = Path(workdir or _default_workdir(recipe))

    def progress(event: StageEvent) -> None:
        if state.json:
            return
        tail = f" in {event.seconds:.1f} s" if event.seconds is not None else ""
        where = f" -> {event.folder}" if event.status in ("cached", "done") else ""
        click.echo(
            f"[{event.index}/{event.total}] {event.name:<14} {_WORDS.get(event.status, event.status)}{tail}{where}",
            err=True,
        )

    try:
        result = run_recipe(
            parsed,
            folder,
            from_stage=from_stage,
            until=until,
            force=force,
            dry_run=dry_run,
            on_event=progress,
        )
    except GateFailed:
        click.echo(f"report: {folder / 'report' / 'report.html'}", err=True)
        raise
    payload: dict[str, Any] = result.to_dict()
    if dry_run:
        lines = [f"plan for {recipe} in {folder}:"]
        for index, item in enumerate(result.stages, start=1):
            lines.append(f"  {index}. {item.name:<14} {item.action:<7} {item.key[:16]}  {item.folder}")
        emit(state, payload, "\n".join(lines))
        return
    report = f"{result.report_dir}/report.html" if result.report_dir else "no report"
    emit(state, payload, f"done: {len(result.stages)} stages in {folder}; report: {report}")
