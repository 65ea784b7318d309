"""The report of a `temper run`: PNG drawing (png, font), charts, and the HTML page (build)."""

from temper.report.build import build_report

__all__ = ["build_report"]
