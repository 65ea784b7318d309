"""The report of a `temper run`: PNG drawing (png, font), charts, and the HTML page (build); and
the end of every command in the terminal (summary). `build_report` is imported on first use, so
the CLI's summary does not load numpy and the charts."""

from typing import Any

__all__ = ["build_report"]


def __getattr__(name: str) -> Any:
    if name == "build_report":
        from temper.report.build import build_report

        return build_report
    raise AttributeError(f"module 'temper.report' has no attribute {name!r}")
