"""Orchestration across commands: online DPO rounds now, the whole lifecycle (`temper run`)
later. A workflow runs other commands through the command runner the CLI hands it
(`temper.cli.Commands`), so nothing below the CLI imports a recipe or a command."""
