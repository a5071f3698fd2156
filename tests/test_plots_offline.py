"""`dvc plots show` and `dvc plots diff` draw every plot on a machine without internet: the repository's .dvc/config
names .dvc/plots/offline.html, DVC's page with vega, vega-lite and vega-embed inlined (DVC's own page loads them from
a CDN). Checked in headless Chromium with the network off, on a small git + DVC repository holding one plot of each
kind dvc.yaml declares: TSV curves (DVCLive), JSON curves, the confusion template, bar_horizontal, a CSV, PNGs."""

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
from configobj import ConfigObj
from PIL import Image

from helpers import ROOT, run

# The plot kinds of this repository's dvc.yaml, on files of the same shapes as the pipeline writes
PLOTS = [
    {"dvclive/plots/metrics/train": {"x": "step"}},
    {"reports/plots/confusion": {"template": "confusion", "x": "actual", "y": "predicted"}},
    {"reports/plots/pr": {"x": "recall", "y": "precision"}},
    {"reports/sweep/trials.csv": {"x": "trial", "y": "objective", "title": "the sweep's objective over trials"}},
    {"reports/sweep/importance.json": {"template": "bar_horizontal", "x": "importance", "y": "param"}},
    "reports/figures",
]
VEGA_FILES = 2 + 2 + 2 + 1 + 1  # one Vega plot per data file below
PNGS = 2

# Whether vega drew into each of these divs: its canvas has a painted pixel, or its svg holds marks (vega's root
# element has the class "marks"; vega-embed's action menu holds an svg icon of its own, so a bare `svg` would not do)
DRAWN = """ids => ids.map(id => {
    const marks = document.getElementById(id)?.querySelector(".marks");
    let drawn = false;
    if (marks && marks.tagName === "CANVAS" && marks.width > 0 && marks.height > 0) {
        const pixels = marks.getContext("2d").getImageData(0, 0, marks.width, marks.height).data;
        drawn = pixels.some((value, i) => i % 4 === 3 && value > 0);
    } else if (marks && marks.tagName.toLowerCase() === "svg") {
        drawn = marks.querySelectorAll("path, rect, line, text").length > 0;
    }
    return [id, drawn];
})"""
IMAGES_LOADED = "() => [...document.images].map(img => [img.getAttribute('src'), img.complete && img.naturalWidth > 0])"


def vega_plots(html: str) -> list[str]:
    """The ids of the Vega plots on DVC's page that have data to draw. Each is a div whose script reads
    `var spec = {...}; vegaEmbed('#<id>', spec);` (vega-embed replaces the script as it draws); a plot dvc.yaml
    declares whose file does not exist (the sweep's, before any sweep) gets `var spec = {};`."""
    return [plot for spec, plot in re.findall(r"var spec = (.*?);\s*vegaEmbed\('#([\w-]+)'", html, re.S)
            if spec != "{}"]


def write_plots(repo: Path, shift: float) -> None:
    """Small files of each kind; `shift` moves the curves so that two revisions differ."""
    for folder in ("dvclive/plots/metrics/train", "reports/plots/confusion", "reports/plots/pr", "reports/sweep",
                   "reports/figures"):
        (repo / folder).mkdir(parents=True, exist_ok=True)
    train = repo / "dvclive/plots/metrics/train"
    for name in ("loss_image", "loss_text"):
        (train / f"{name}.tsv").write_text("step\t" + name + "\n" + "".join(
            f"{step}\t{2.0 / (step + 1) + shift}\n" for step in range(0, 50, 5)))
    for task in ("image", "text"):
        (repo / f"reports/plots/confusion/{task}.json").write_text(json.dumps(
            [{"actual": a, "predicted": (a + i) % 3} for a in range(3) for i in range(4)]))
        (repo / f"reports/plots/pr/{task}.json").write_text(json.dumps(
            [{"recall": r / 10, "precision": 1 - r / 20 - shift} for r in range(11)]))
    (repo / "reports/sweep/trials.csv").write_text("trial,objective\n" + "".join(
        f"{t},{0.5 + t / 20 + shift}\n" for t in range(6)))
    (repo / "reports/sweep/importance.json").write_text(json.dumps(
        [{"param": "train.lr", "importance": 0.7 - shift}, {"param": "train.epochs", "importance": 0.3 + shift}]))
    for i in range(PNGS):
        Image.new("RGB", (40, 30), (200, 60 * i, int(100 * shift))).save(repo / f"reports/figures/figure_{i}.png")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git + DVC repository with this repository's DVC configuration (.dvc/config and .dvc/plots, as a clone has
    them), the plots committed, then changed in the workspace: `dvc plots diff HEAD` compares two revisions."""
    repo = tmp_path_factory.mktemp("plots")
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    shutil.copy(ROOT / ".dvc/config", repo / ".dvc/config")
    shutil.copytree(ROOT / ".dvc/plots", repo / ".dvc/plots")
    (repo / "dvc.yaml").write_text(json.dumps({"plots": PLOTS}))  # JSON is YAML
    write_plots(repo, shift=0.0)
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "plots"], repo)
    write_plots(repo, shift=0.1)
    return repo


@pytest.fixture(scope="module")
def offline_page():
    """Opens a local page in headless Chromium with the network off (offline, and every request that is not a
    local file aborted); returns what it drew and every request it tried to make off the machine."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    browser_path = shutil.which("chromium")
    assert browser_path, "Debian's chromium is needed: apt-get install chromium (.ci/run does)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])  # a fresh profile: Playwright's own

        def open_offline(page_path: Path) -> dict:
            context = browser.new_context()
            context.set_offline(True)
            remote, errors = [], []
            local = ("file:", "data:", "blob:", "about:")

            def only_local(route):
                if route.request.url.startswith(local):
                    route.continue_()
                else:
                    route.abort()
            context.route("**/*", only_local)
            page = context.new_page()
            page.on("request", lambda r: None if r.url.startswith(local) else remote.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))
            plots = vega_plots(page_path.read_text(encoding="utf8"))
            page.goto(page_path.as_uri())
            try:  # vega-embed draws asynchronously
                page.wait_for_function(f"ids => ({DRAWN})(ids).every(([id, drawn]) => drawn)", arg=plots,
                                       timeout=30_000)
            except PlaywrightTimeout:
                pass  # the assertions below say which plots stayed blank
            drawn = dict(page.evaluate(DRAWN, plots))
            images = dict(page.evaluate(IMAGES_LOADED))
            context.close()
            return {"drawn": drawn, "images": images, "remote": remote, "errors": errors}

        yield open_offline
        browser.close()


def assert_every_plot_drew(seen: dict, plots: int, images: int) -> None:
    blank = [name for name, drawn in seen["drawn"].items() if not drawn]
    assert len(seen["drawn"]) == plots and not blank, (
        f"{len(seen['drawn'])} Vega plots, blank: {blank}; page errors: {seen['errors']}; "
        f"requests off the machine: {seen['remote']}")
    assert seen["remote"] == [], f"the page asked the network for {seen['remote']}"
    assert seen["errors"] == []
    assert len(seen["images"]) == images and all(seen["images"].values()), seen["images"]


def test_the_configured_page_inlines_the_npm_files_its_build_script_pins_and_names():
    """The page .dvc/config names holds, byte for byte (by sha256), the files its header names, from the packages
    build_offline.sh pins: whoever bumps a version reruns the script, and the header stays true."""
    page = ROOT / ".dvc" / ConfigObj(str(ROOT / ".dvc/config"))["plots"]["html_template"]
    assert page == ROOT / ".dvc/plots/offline.html"
    html = page.read_text(encoding="utf8")
    pinned = re.search(r"^packages=\((.*)\)$", (ROOT / ".dvc/plots/build_offline.sh").read_text(), re.M).group(1)
    recorded = re.findall(r"^  (\S+) (\S+): npm pack \S+, \S+, sha256 ([0-9a-f]{64})$", html, re.M)
    assert [f"{name}@{version}" for name, version, _ in recorded] == pinned.split()
    inlined = re.findall(r"<script>(.*?)</script>", html, re.S)
    assert [hashlib.sha256(s.encode()).hexdigest() for s in inlined] == [sha for *_, sha in recorded]


@pytest.mark.slow
def test_dvc_plots_show_draws_every_plot_with_the_network_off(repo, offline_page):
    run(["dvc", "plots", "show", "-o", "show"], repo)
    assert_every_plot_drew(offline_page(repo / "show/index.html"), plots=VEGA_FILES, images=PNGS)


@pytest.mark.slow
def test_dvc_plots_diff_draws_both_revisions_with_the_network_off(repo, offline_page):
    run(["dvc", "plots", "diff", "HEAD", "-o", "diff"], repo)
    page = repo / "diff/index.html"
    assert "HEAD" in page.read_text(encoding="utf8") and "workspace" in page.read_text(encoding="utf8")
    # each figure at HEAD and in the workspace; each Vega plot draws both revisions
    assert_every_plot_drew(offline_page(page), plots=VEGA_FILES, images=2 * PNGS)


@pytest.mark.slow
def test_the_pipelines_own_plots_draw_with_the_network_off(dvc_repo, offline_page, tmp_path):
    """Every plot a tiny `dvc repro` of this repository's pipeline leaves (DVCLive's training curves, PR curves,
    confusion matrices, deletion curves, figures), drawn with the configured page. (The sweep's plots have no files
    until `tessera sweep` runs.)"""
    page = ROOT / ".dvc/plots/offline.html"
    run(["dvc", "plots", "show", "--html-template", str(page), "-o", str(tmp_path / "show")], dvc_repo)
    html = (tmp_path / "show/index.html").read_text(encoding="utf8")
    seen = offline_page(tmp_path / "show/index.html")
    kinds = ("models_train_dvclive_plots_metrics", "reports_plots_confusion", "reports_plots_pr",
             "reports_plots_deletion")
    assert all(any(plot.startswith(kind) for plot in seen["drawn"]) for kind in kinds), sorted(seen["drawn"])
    figures = list((dvc_repo / "reports/figures").glob("*.png"))
    assert_every_plot_drew(seen, plots=len(vega_plots(html)), images=len(figures))
