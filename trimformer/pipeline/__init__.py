"""Orchestration only: recipe schema, plan, runner (cache, atomic writes), the pass-context builder, stages/, report."""
