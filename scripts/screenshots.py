"""Screenshots of the Dagster UI's main pages for docs/ui.md, from a running ``dagster dev``.

    python scripts/screenshots.py --url http://127.0.0.1:3000 --out docs/img

Needs Chromium (Debian: ``apt-get install -y chromium``) and a code location that has
generated at least one video. Drives headless Chromium over the DevTools protocol (with the
``websockets`` package dagster-webserver already brings), so it can open the inline thumbnail
of a videos partition before taking the picture. Not part of CI: the UI's look changes with
every Dagster release.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import requests
from websockets.sync.client import connect

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
]
# Clicks the "[Show Markdown]" of the metadata row labelled ``thumbnail``, to show the frame.
OPEN_THUMBNAIL = """(() => {
  for (const row of document.querySelectorAll('tr')) {
    if (row.cells.length > 1 && row.cells[0].innerText.trim() === 'thumbnail') {
      const link = [...row.querySelectorAll('a')].find(e => /Show Markdown/.test(e.innerText));
      if (link) { link.click(); return true; }
    }
  }
  return false;
})()"""


def graphql(url: str, query: str, **variables) -> dict:
    resp = requests.post(f"{url}/graphql", json={"query": query, "variables": variables}, timeout=30)
    resp.raise_for_status()
    return resp.json()["data"]


def location_name(url: str) -> str:
    data = graphql(url, "{ workspaceOrError { ... on Workspace { locationEntries { name } } } }")
    return data["workspaceOrError"]["locationEntries"][0]["name"]


def a_video_partition(url: str) -> str:
    data = graphql(
        url,
        """{ assetOrError(assetKey: {path: ["videos"]}) { ... on Asset {
        assetMaterializations(limit: 1) { partition } } } }""",
    )
    found = data["assetOrError"]["assetMaterializations"]
    if not found:
        sys.exit("no videos partition is materialized yet: generate something first")
    return found[0]["partition"]


def pages(url: str) -> dict[str, tuple[str, str | None]]:
    """File name → (page address, script to run before the picture)."""
    location = quote(location_name(url))
    partition = quote(a_video_partition(url))
    return {
        "asset-graph.png": (f"{url}/locations/{location}/asset-groups/vidu", None),
        "videos-partition.png": (f"{url}/assets/videos?view=partitions&partition={partition}", None),
        "videos-thumbnail.png": (f"{url}/assets/videos?view=partitions&partition={partition}", OPEN_THUMBNAIL),
        "lineage-asset.png": (f"{url}/assets/lineage", None),
        "lineage-checks.png": (f"{url}/assets/lineage?view=checks", None),
        "runs.png": (f"{url}/runs", None),
        "jobs.png": (f"{url}/jobs", None),
        "task-sensor.png": (f"{url}/locations/{location}/sensors/vidu_task_sensor", None),
        "automation.png": (f"{url}/automation", None),
    }


class Browser:
    """Headless Chromium on a fresh profile, one page, driven over the DevTools protocol."""

    def __init__(self, chromium: str, width: int, height: int):
        self._profile = tempfile.TemporaryDirectory(prefix="vidu-shot-")
        self._proc = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={self._profile.name}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        port = self._devtools_port()
        page = next(
            t for t in requests.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json() if t["type"] == "page"
        )
        self._ws = connect(page["webSocketDebuggerUrl"], max_size=None)
        self._ids = itertools.count(1)
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def _devtools_port(self) -> int:
        assert self._proc.stderr is not None
        for line in self._proc.stderr:
            found = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if found:
                return int(found.group(1))
        raise RuntimeError("chromium exited before opening its DevTools port")

    def call(self, method: str, **params) -> dict:
        call_id = next(self._ids)
        self._ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv(timeout=60))
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def shoot(self, page: str, out: Path, settle_s: float, script: str | None) -> None:
        self.call("Page.navigate", url=page)
        time.sleep(settle_s)  # the UI is a single-page app that keeps polling: no "loaded" moment
        if script:
            done = self.call("Runtime.evaluate", expression=script, returnByValue=True)
            if not done["result"].get("value"):
                print(f"{out.name}: the script found nothing to click", file=sys.stderr)
            time.sleep(2)
        out.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        self._ws.close()
        self._proc.terminate()
        self._proc.wait(timeout=20)
        self._profile.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:3000", help="the running webserver")
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    parser.add_argument("--size", default="1280,800", help="window size in pixels, WIDTH,HEIGHT")
    parser.add_argument("--settle", type=float, default=8.0, help="seconds a page gets to render")
    parser.add_argument("--only", nargs="*", help="file names to take (default: all)")
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        sys.exit("chromium is not installed (Debian: apt-get install -y chromium)")
    url = args.url.rstrip("/")
    args.out.mkdir(parents=True, exist_ok=True)
    graphql(url, "mutation { setNuxSeen }")  # no "join the community" dialog on top
    width, height = (int(v) for v in args.size.split(","))
    browser = Browser(chromium, width, height)
    try:
        for name, (page, script) in pages(url).items():
            if args.only and name not in args.only:
                continue
            browser.shoot(page, args.out / name, args.settle, script)
            print(f"{args.out / name}: {page}")
    finally:
        browser.close()


if __name__ == "__main__":
    main()
