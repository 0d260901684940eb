"""TensorBoard as a person first sees it: serve a log directory, open it in headless Chromium
(the Debian package ``chromium``), and report where each card lies on the first screen.

    .venv/bin/python tests/monitor/landing_page.py runs/default/tensorboard --screenshot /tmp/landing.png

prints, for the page TensorBoard opens on (Time Series) and for the Scalars tab, the cards whose
title is on the first screen. Chromium is driven over its DevTools pipe (file descriptors 3 and
4), so nothing beyond the standard library and the browser is needed."""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Optional

TITLE = 40  # px of a card's top that hold its title: a card whose title shows is "on the screen"
PLOT = 300  # px of a Time Series card's top that hold its title and plot (its data table follows)

# Time Series: each card-view names its tag in a tb-truncated-path's title.
CARDS_JS = """(() => {
  const cards = [...document.querySelectorAll('card-view')].map(c => {
    const p = c.querySelector('tb-truncated-path'), r = c.getBoundingClientRect();
    return p && {tag: p.title, top: r.top, bottom: r.bottom, left: r.left, right: r.right};
  }).filter(Boolean);
  return {width: innerWidth, height: innerHeight, cards};
})()"""

# The Scalars tab (Polymer, in shadow roots): each chart names its tag in a tf-card-heading.
SCALARS_JS = """(() => {
  const found = [];
  const walk = root => root.querySelectorAll('*').forEach(e => {
    if (e.tagName === 'TF-SCALAR-CARD' && e.tag) {
      const r = e.getBoundingClientRect();
      if (r.height > 0) found.push({tag: e.tag, top: r.top, bottom: r.bottom, left: r.left, right: r.right});
    }
    if (e.shadowRoot) walk(e.shadowRoot);
  });
  walk(document);
  return {width: innerWidth, height: innerHeight, cards: found};
})()"""


def chromium() -> Optional[str]:
    """The browser's executable, or None where it is not installed."""
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


class TensorBoard:
    """``tensorboard --logdir`` on a free port, until closed; ``url`` once it serves the run's tags."""

    def __init__(self, logdir: Path, timeout: float = 60.0) -> None:
        exe = Path(sys.executable).parent / "tensorboard"
        cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "tensorboard.main"]
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([*cmd, "--logdir", str(logdir), "--port", "0", "--load_fast", "false",
                                      "--reload_interval", "1"], stdout=self.log, stderr=self.log)
        self.url = self._wait(timeout)

    def _wait(self, timeout: float) -> str:
        """The URL, once the scalars the run wrote are listed (the first load is asynchronous)."""
        end, url = time.time() + timeout, None
        while time.time() < end:
            if self.proc.poll() is not None:
                break
            self.log.seek(0)
            found = re.search(rb"at (http://\S+/) ", self.log.read())
            url = found.group(1).decode() if found else None
            if url and self._listed(url):
                return url
            time.sleep(0.5)
        self.log.seek(0)
        self.close()
        raise RuntimeError(f"TensorBoard did not serve the run's scalars: {self.log.read()[-2000:]!r}")

    @staticmethod
    def _listed(url: str) -> bool:
        try:
            with urllib.request.urlopen(url + "data/plugin/scalars/tags", timeout=5) as r:
                return any(json.loads(r.read()).values())
        except OSError:
            return False

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Browser:
    """Headless Chromium driven over the DevTools pipe: one page, commands by ``call``."""

    def __init__(self, width: int, height: int) -> None:
        exe = chromium()
        if exe is None:
            raise RuntimeError("chromium is not installed (Debian: apt-get install -y chromium)")
        self.profile = tempfile.mkdtemp(prefix="chromium-")
        to_browser, self._in = os.pipe()  # our commands -> its fd 3
        self._out, from_browser = os.pipe()  # its fd 4 -> our replies

        def fds() -> None:  # in the child: the pipe ends as fds 3 and 4 (dup first: they may collide)
            a, b = os.dup(to_browser), os.dup(from_browser)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
             "--hide-scrollbars", "--mute-audio", f"--user-data-dir={self.profile}", "about:blank"],
            preexec_fn=fds, pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._id, self._buf, self.session = 0, b"", None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.size(width, height)

    def call(self, method: str, **params) -> dict:
        """Send one DevTools command and return its result (events in between are dropped)."""
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session:
            msg["sessionId"] = self.session
        os.write(self._in, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                chunk = os.read(self._out, 1 << 16)
                if not chunk:
                    raise RuntimeError(f"chromium closed the pipe during {method}")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def size(self, width: int, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def evaluate(self, js: str):
        return self.call("Runtime.evaluate", expression=js, returnByValue=True)["result"].get("value")

    def screenshot(self, path: Path) -> None:
        Path(path).write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        os.close(self._in)
        os.close(self._out)
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


def settled(browser: Browser, js: str, expect: int, timeout: float = 60.0) -> dict:
    """The page's cards once at least ``expect`` are there and two looks a second apart agree."""
    end, last = time.time() + timeout, None
    while time.time() < end:
        now = browser.evaluate(js)
        if now and len(now["cards"]) >= expect and now == last:
            return now
        last = now
        time.sleep(1.0)
    raise RuntimeError(f"the page did not settle in {timeout:.0f} s (last saw {last})")


def on_screen(page: dict) -> list:
    """Tags whose card title lies on the first screen, top to bottom, left to right."""
    shown = [c for c in page["cards"] if 0 <= c["top"] and c["top"] + TITLE <= page["height"]
             and c["left"] < page["width"]]
    return [c["tag"] for c in sorted(shown, key=lambda c: (c["top"], c["left"]))]


def plotted(page: dict, tag: str) -> bool:
    """Whether the card's title and plot lie whole on the first screen."""
    top = next(c["top"] for c in page["cards"] if c["tag"] == tag)
    return 0 <= top and top + PLOT <= page["height"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logdir", type=Path)
    parser.add_argument("--size", default="1366x768", help="the window, WIDTHxHEIGHT (default: a small laptop)")
    parser.add_argument("--screenshot", type=Path, help="save each page's first screen here (Scalars: *_scalars.png)")
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    board = TensorBoard(args.logdir)
    browser = Browser(width, height)
    try:
        for name, path, js in (("Time Series (the landing page)", "", CARDS_JS), ("Scalars", "#scalars", SCALARS_JS)):
            browser.open(board.url + path)
            page = settled(browser, js, expect=1)
            print(f"{name}, first screen at {width}x{height}:")
            for tag in on_screen(page):
                print(f"  {tag}{'' if path or plotted(page, tag) else '  (title only)'}")
            if args.screenshot:
                time.sleep(3)  # the charts' data arrive after the layout
                shot = args.screenshot if not path else args.screenshot.with_name(args.screenshot.stem + "_scalars.png")
                browser.screenshot(shot)
                print(f"  screenshot: {shot}")
    finally:
        browser.close()
        board.close()


if __name__ == "__main__":
    main()
