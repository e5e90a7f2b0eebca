"""The ``disagfusion`` command: run the stack, send it work, look at it.

An application above the services: it may import ``disagfusion`` and ``services`` (the
scheduler's planner), and nothing imports it. One module per group of commands: ``stack``
(up, down, scale, status), ``jobs`` (generate, submit, cancel) and ``tools`` (profile, plan,
init-model; ``engram`` and ``dlq`` are groups of their own).
"""

from __future__ import annotations

import typer

from disagfusion_cli import dlq, engram, jobs, stack, tools

app = typer.Typer(help="DisagFusion: diffusion models served as a disaggregated pipeline.", no_args_is_help=True)

app.command()(stack.up)
app.command()(stack.down)
app.command("scale")(stack.scale_services)
app.command()(stack.status)
app.command()(jobs.generate)
app.command()(jobs.submit)
app.command()(jobs.cancel)
app.command()(tools.profile)
app.command()(tools.plan)
app.command("init-model")(tools.init_model)
app.add_typer(engram.app, name="engram")
app.add_typer(dlq.app, name="dlq")
