"""The README's screenshot of a report page, in headless Chromium (see tests/browser.py):

    python docs/screenshot.py forvalue-demo/classes/report/index.html docs/report.png [--height 2400]
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from browser import headless_chromium, missing  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("page")
p.add_argument("png")
p.add_argument("--width", type=int, default=1280)
p.add_argument("--height", type=int, default=2400, help="the top of the page this tall is captured")
args = p.parse_args()
if missing():
    sys.exit(f"screenshot: {missing()}")
with tempfile.TemporaryDirectory() as profile:
    driver = headless_chromium(profile, args.width, args.height)
    try:
        driver.get(Path(args.page).resolve().as_uri())
        driver.save_screenshot(args.png)
    finally:
        driver.quit()
print(args.png)
