"""Screenshots of the report's reviewer sections, for docs/: each section from its heading to the next <h2>.

    .venv/bin/python benchmarks/report_screenshots.py runs/demo/report.html --out docs

Writes docs/report-subjects.png (per-subject table with MDE), report-training.png (loss and validation curve),
report-audit.png, report-conformal.png and report-checklist.png. Needs playwright (the `test` extra) and a Chromium:
`/usr/bin/chromium` (Debian's package) unless --chromium names another.
"""

from __future__ import annotations

import argparse
from pathlib import Path

SECTIONS = {"subjects": "subjects", "training": "training", "audit": "audit", "conformal": "conformal",
            "checklist": "checklist"}
# the region from a heading to the next top-level heading (or the page's end)
REGION = """id => {
  const start = document.getElementById(id);
  if (!start) return null;
  let end = start.nextElementSibling;
  while (end && end.tagName !== 'H2') end = end.nextElementSibling;
  const top = start.getBoundingClientRect().top + window.scrollY - 8;
  const bottom = end ? end.getBoundingClientRect().top + window.scrollY - 4 : document.body.scrollHeight;
  return {x: 0, y: top, width: document.documentElement.clientWidth, height: bottom - top};
}"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", type=Path)
    p.add_argument("--out", type=Path, default=Path("docs"))
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("--width", type=int, default=1100)
    args = p.parse_args(argv)
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    missing = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": args.width, "height": 1200})
        page.goto(args.report.resolve().as_uri())
        for name, anchor in SECTIONS.items():
            clip = page.evaluate(REGION, anchor)
            if clip is None:
                missing.append(name)
                continue
            path = args.out / f"report-{name}.png"
            page.screenshot(path=str(path), clip=clip, full_page=True)
            print(f"{path}: {clip['height']:.0f} px high")
        browser.close()
    if missing:
        print(f"not in the report: {', '.join(missing)}")
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
