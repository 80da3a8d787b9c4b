"""Training curves as HTML and PNG: held-out relative perplexity change by ahead position over steps.

    python bench/plot_curves.py --run gated=results/runs/gated_metrics.jsonl \
        --run pause=results/runs/pause_metrics.jsonl --out results/curves_gated_vs_pause

writes OUT.csv (the numbers) and OUT.png (rendered by Debian's Chromium through Playwright; skipped
with a message when either is missing); `--html` keeps the interactive plotly page as OUT.html.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cacheaug_core.viz.curves import chain_stages, curve_frame, read_metrics, training_curve_figure  # noqa: E402
from cacheaug_core.viz.figures import figure_to_html  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def render_png(html: Path, png: Path, width: int, height: int) -> bool:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("no playwright: PNG skipped", file=sys.stderr)
        return False
    if not Path(CHROMIUM).exists():
        print(f"no {CHROMIUM}: PNG skipped", file=sys.stderr)
        return False
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": width + 40, "height": height + 40})
        page.goto(html.resolve().as_uri())
        page.wait_for_selector(".main-svg", timeout=30_000)
        page.screenshot(path=str(png), full_page=True)
        browser.close()
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True, help="NAME=metrics.jsonl (repeat); NAME=A.jsonl+B.jsonl: a run "
                    "trained in stages (B started from A's weights), B's steps counted on from A's last")
    ap.add_argument("--positions", default="1,2,4,8,16")
    ap.add_argument("--out", required=True, help="output path without extension")
    ap.add_argument("--html", action="store_true", help="keep the interactive OUT.html (about 5 MB)")
    args = ap.parse_args(argv)
    runs = {}
    for spec in args.run:
        name, _, path = spec.partition("=")
        if not path:
            ap.error(f"--run takes NAME=FILE, got {spec!r}")
        runs[name] = chain_stages([read_metrics(p) for p in path.split("+")])
    df = curve_frame(runs)
    if df.empty:
        ap.error("no evaluation records in the given files")
    fig = training_curve_figure(df, positions=[int(x) for x in args.positions.split(",")])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".html").write_text(figure_to_html(fig), encoding="utf-8")
    df.to_csv(out.with_suffix(".csv"), index=False)
    ok = render_png(out.with_suffix(".html"), out.with_suffix(".png"), fig.layout.width, fig.layout.height)
    if not args.html:
        out.with_suffix(".html").unlink()
    print(f"wrote {out}.csv" + (f", {out}.png" if ok else "") + (f", {out}.html" if args.html else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
