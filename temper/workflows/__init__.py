"""Orchestration across commands: online DPO rounds (`online_dpo`) and pipelines of commands from
one YAML (`lifecycle`, `temper run`). A workflow runs other commands through the command runner
the CLI hands it (`temper.cli.Commands`), so nothing below the CLI imports a recipe or a command."""
