"""Open a run report (``embedtrain report RUN_DIR``) in headless Chromium: screenshot it and say which plots loaded.

    embedtrain report runs/diagnostics_experiment/correlation
    python scripts/report_browser_check.py runs/diagnostics_experiment/correlation/report.html \\
        --screenshot benchmarks/report_screenshot.png --output benchmarks/report_browser.json

Needs a Chromium (Debian: ``apt-get install -y chromium``, at /usr/bin/chromium) and the ``playwright``
package from PyPI (``pip install playwright``; no browser download: it drives the system Chromium through
``--chromium``). Not a CI test: CI machines have no browser. The page is opened from its file with the
network blocked, so a plot only loads if the page carries it. Writes JSON: for each image its id, whether it
decoded (``complete`` with a non-zero natural width) and its size; and whether every plot loaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import write_json  # noqa: E402

IMAGES = """() => Array.from(document.images).map(img => ({
    id: img.id, alt: img.alt, loaded: img.complete && img.naturalWidth > 0,
    natural_width: img.naturalWidth, natural_height: img.naturalHeight,
    data_uri: img.src.startsWith('data:image/png;base64,')}))"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", help="the report.html to open")
    parser.add_argument("--screenshot", required=True, help="PNG of the whole page")
    parser.add_argument("--output", default=None, help="write the JSON here")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="the Chromium executable")
    parser.add_argument("--width", type=int, default=1400)
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    page_path = Path(args.report).resolve()
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, headless=True)
        page = browser.new_page(viewport={"width": args.width, "height": 900})
        # anything but the file itself and its inline data would mean the page is not self-contained
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file:", "data:"))
                   else (requests.append(route.request.url), route.abort())[1])
        page.goto(page_path.as_uri(), wait_until="load")
        images = page.evaluate(IMAGES)
        Path(args.screenshot).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=args.screenshot, full_page=True)
        version = browser.version
        browser.close()
    doc = {
        "report": str(args.report), "browser": f"Chromium {version} (headless)", "screenshot": args.screenshot,
        "images": images, "plots": len(images), "loaded": sum(i["loaded"] for i in images),
        "all_loaded": bool(images) and all(i["loaded"] and i["data_uri"] for i in images),
        "outside_requests": requests,
    }
    write_json(doc, args.output)
    return 0 if doc["all_loaded"] and not requests else 1


if __name__ == "__main__":
    sys.exit(main())
