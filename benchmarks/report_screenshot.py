"""A screenshot of a `temper run` report, taken by headless Chromium (for the README).

    python benchmarks/report_screenshot.py runs/lifecycle-tiny report.png [--width 1280 --height 2400
                                          --browser /usr/bin/chromium --rebuild]

RUN_DIR is a run's output directory; its report.html is built first when missing (or with
--rebuild). The browser is --browser, else the first of chromium, chromium-browser, google-chrome,
google-chrome-stable found on PATH. The page is rendered at --width x --height CSS pixels; what
does not fit is cut off (raise --height for a long report).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser(given: str | None = None) -> str | None:
    if given:
        return shutil.which(given) or (given if Path(given).is_file() else None)
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


def headless(browser: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `browser` headless (no sandbox: it runs as root in containers, no GPU) with `args`."""
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--no-first-run", "--disable-dev-shm-usage", *args],
                          capture_output=True, text=True, timeout=timeout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2400)
    parser.add_argument("--browser", default=None)
    parser.add_argument("--rebuild", action="store_true", help="rebuild report.html first")
    args = parser.parse_args()
    html = args.run_dir / "report.html"
    if args.rebuild or not html.is_file():
        from temper.report import build_report

        html = build_report(args.run_dir)
    browser = find_browser(args.browser)
    if browser is None:
        print(f"no browser found (tried {', '.join(BROWSERS)}); give --browser PATH", file=sys.stderr)
        return 1
    out = args.out.resolve()
    done = headless(browser, f"--screenshot={out}", f"--window-size={args.width},{args.height}",
                    "--virtual-time-budget=5000", html.resolve().as_uri())
    if done.returncode != 0 or not out.is_file():
        print(f"{browser} failed ({done.returncode}): {done.stderr.strip()[-2000:]}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({args.width}x{args.height}) from {html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
