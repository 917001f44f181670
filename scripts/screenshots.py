"""Screenshots of the Dagster UI's main pages for docs/ui.md, from a running ``dagster dev``.

    python scripts/screenshots.py --url http://127.0.0.1:3000 --out docs/img

Needs Chromium (Debian: ``apt-get install -y chromium``) and a code location that has
generated at least one video. Not part of CI: the UI's look changes with every Dagster release.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import quote

import requests

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
]


def graphql(url: str, query: str, **variables) -> dict:
    resp = requests.post(f"{url}/graphql", json={"query": query, "variables": variables}, timeout=30)
    resp.raise_for_status()
    return resp.json()["data"]


def location_name(url: str) -> str:
    data = graphql(url, "{ workspaceOrError { ... on Workspace { locationEntries { name } } } }")
    return data["workspaceOrError"]["locationEntries"][0]["name"]


def a_video_partition(url: str) -> str:
    data = graphql(url, """{ assetOrError(assetKey: {path: ["videos"]}) { ... on Asset {
        assetMaterializations(limit: 1) { partition } } } }""")
    found = data["assetOrError"]["assetMaterializations"]
    if not found:
        sys.exit("no videos partition is materialized yet: generate something first")
    return found[0]["partition"]


def pages(url: str) -> dict[str, str]:
    """File name → page address."""
    location = quote(location_name(url))
    partition = quote(a_video_partition(url))
    return {
        "asset-graph.png": f"{url}/asset-groups",
        "videos-partition.png": f"{url}/assets/videos?view=partitions&partition={partition}",
        "lineage-asset.png": f"{url}/assets/lineage",
        "runs.png": f"{url}/runs",
        "jobs.png": f"{url}/jobs",
        "task-sensor.png": f"{url}/locations/{location}/sensors/vidu_task_sensor",
        "automation.png": f"{url}/automation",
    }


def screenshot(chromium: str, page: str, out: Path, size: str, wait_ms: int) -> None:
    with tempfile.TemporaryDirectory(prefix="vidu-shot-") as profile:
        subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
             f"--virtual-time-budget={wait_ms}", f"--screenshot={out}", page],
            check=True, timeout=120, capture_output=True,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:3000", help="the running webserver")
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    parser.add_argument("--size", default="1440,900", help="window size in pixels, WIDTH,HEIGHT")
    parser.add_argument("--wait-ms", type=int, default=20000, help="time the page gets to render")
    parser.add_argument("--only", nargs="*", help="file names to take (default: all)")
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        sys.exit("chromium is not installed (Debian: apt-get install -y chromium)")
    args.out.mkdir(parents=True, exist_ok=True)
    for name, page in pages(args.url.rstrip("/")).items():
        if args.only and name not in args.only:
            continue
        screenshot(chromium, page, args.out / name, args.size, args.wait_ms)
        print(f"{args.out / name}: {page}")


if __name__ == "__main__":
    main()
