"""Screenshot an HTML report with headless Chromium, to look at it without a browser.

Needs a `chromium` binary (Debian: ``apt-get install -y chromium``). Network, sync, component updates
and first-run UI are off and a throwaway profile is used, so nothing outside the page is touched.

    python tools/screenshot_report.py analysis_out/report.html --out /tmp/report.png --size 1200,2000
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path, help="the HTML file")
    parser.add_argument("--out", type=Path, default=Path("/tmp/report.png"), help="PNG to write")
    parser.add_argument("--size", default="1200,2000", help="window width,height in pixels")
    parser.add_argument("--chromium", default="chromium", help="Chromium executable")
    args = parser.parse_args()
    if not args.report.is_file():
        parser.error(f"report {args.report} does not exist")
    binary = shutil.which(args.chromium)
    if binary is None:
        parser.error(f"no {args.chromium!r} on PATH; install it (Debian: apt-get install -y chromium)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                f"--screenshot={args.out.resolve()}", f"--window-size={args.size}", args.report.resolve().as_uri(),
            ],
            check=True,
            timeout=120,
            capture_output=True,
        )
    print(f"screenshot: {args.out}")


if __name__ == "__main__":
    main()
