"""TensorBoard as a person opens it: a short run's log directory served by TensorBoard and
rendered in headless Chromium; the first screen of the landing page (Time Series) and of the
Scalars tab shows how training goes (loss, validation top-1, LR, throughput), nothing internal.
Skipped where Chromium is not installed (Debian: ``apt-get install -y chromium``)."""

import pytest

from revcol_dist.config import load_config
from revcol_dist.engine.train import train

from .landing_page import CARDS_JS, SCALARS_JS, Browser, TensorBoard, chromium, on_screen, plotted, settled

HEADLINE = ["1_overview/1_train_loss", "1_overview/2_val_top1", "1_overview/3_lr", "1_overview/4_images_per_sec"]
INTERNAL = ("alpha", "drift", "mem_peak", "grad_norm", "5_speed")


@pytest.mark.slow
@pytest.mark.alone  # waits on TensorBoard and Chromium with time limits (tests/suite.py)
@pytest.mark.skipif(chromium() is None, reason="chromium is not installed (Debian: apt-get install -y chromium)")
def test_first_screen_shows_how_training_goes(tmp_path):
    cfg = load_config("configs/default.yaml", [
        f"output_dir={tmp_path / 'run'}", f"data.root={tmp_path}/digits", "model.args.channels=[8,16,24,32]",
        "model.args.layers=[1,1,1,1]", "model.args.inter_supv=true", "train.batch_size=16", "train.max_steps=3",
        "train.ema_decay=0.9", "monitor.images_every=1", "monitor.console=none", "data.backend=torch"])
    train(cfg, log=lambda *_: None)  # every kind of card: scalars, EMA, histograms, images
    board = TensorBoard(tmp_path / "run" / "tensorboard")
    browser = Browser(1366, 768)  # a small laptop, TensorBoard's settings pane open (its default)
    try:
        browser.open(board.url)
        page = settled(browser, CARDS_JS, expect=len(HEADLINE))
        browser.screenshot(tmp_path / "landing.png")
        # the four headline cards' titles on the first screen, the loss and top-1 plots whole, nothing else
        assert on_screen(page) == HEADLINE, on_screen(page)
        assert plotted(page, HEADLINE[0]) and plotted(page, HEADLINE[1])
        browser.size(1920, 1080)  # a desktop: all four plots whole, still nothing internal
        page = settled(browser, CARDS_JS, expect=len(HEADLINE))
        assert all(plotted(page, t) for t in HEADLINE), page["cards"][:4]
        assert not [t for t in on_screen(page) if any(k in t for k in INTERNAL)], on_screen(page)
        browser.size(1366, 768)
        browser.open(board.url + "#scalars")
        page = settled(browser, SCALARS_JS, expect=len(HEADLINE))
        browser.screenshot(tmp_path / "scalars.png")
        assert on_screen(page)[:len(HEADLINE)] == HEADLINE, on_screen(page)
        assert not [t for t in on_screen(page) if any(k in t for k in INTERNAL)], on_screen(page)
    finally:
        browser.close()
        board.close()
