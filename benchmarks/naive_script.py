"""The naive baseline: a plain ``requests`` loop against the same API (or simulator).

Submits every request of a catalog one after another, then polls every unfinished task once
a second, then downloads every video. No ledger, no retries, no verification: the floor a
hand-written script reaches, to compare ``vidu-pipeline generate`` with.

    python benchmarks/naive_script.py --catalog DIR --out DIR --seeds 1-10 \
        --base-url http://127.0.0.1:PORT --api-key KEY
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import time
from pathlib import Path

import requests

MIMES = {b"\x89PNG": "png", b"\xff\xd8\xff": "jpeg", b"RIFF": "webp"}


def data_uri(path: Path) -> str:
    data = path.read_bytes()
    mime = next((m for magic, m in MIMES.items() if data.startswith(magic)), "png")
    return f"data:image/{mime};base64,{base64.b64encode(data).decode()}"


def seeds_arg(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def bodies(catalog: Path, seeds: list[int]) -> list[dict]:
    images: dict[str, list[str]] = {}
    with open(catalog / "images.csv", newline="") as f:
        for row in csv.DictReader(f):
            images.setdefault(row["subject_id"], []).append(data_uri(catalog / row["image"]))
    out = []
    with open(catalog / "prompts.csv", newline="") as f:
        for row in csv.DictReader(f):
            for seed in seeds:
                body = {"images": images[row["subject_id"]][:7], "prompt": row["prompt"], "seed": seed}
                if row.get("aspect_ratio"):
                    body["aspect_ratio"] = row["aspect_ratio"]
                out.append(body)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--catalog", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=seeds_arg, default=[1])
    p.add_argument("--base-url", required=True)
    p.add_argument("--api-key", required=True)
    args = p.parse_args(argv)

    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {args.api_key}"
    started = time.time()
    task_ids = []
    for body in bodies(args.catalog, args.seeds):
        r = s.post(args.base_url + "/v3/async/vidu-q1-reference2video", json=body, timeout=60)
        r.raise_for_status()
        task_ids.append(r.json()["task_id"])
    first_submit_done = time.time()

    urls: dict[str, str] = {}
    failed: dict[str, str] = {}
    polls = 0
    while len(urls) + len(failed) < len(task_ids):
        tick = time.time()
        for task_id in task_ids:
            if task_id in urls or task_id in failed:
                continue
            r = s.get(args.base_url + "/v3/async/task-result", params={"task_id": task_id}, timeout=60)
            polls += 1
            r.raise_for_status()
            body = r.json()
            status = body["task"]["status"]
            if status == "TASK_STATUS_SUCCEED":
                urls[task_id] = body["videos"][0]["video_url"]
            elif status == "TASK_STATUS_FAILED":
                failed[task_id] = body["task"].get("reason", "")
        if len(urls) + len(failed) < len(task_ids):
            time.sleep(max(0.0, 1.0 - (time.time() - tick)))

    args.out.mkdir(parents=True, exist_ok=True)
    for task_id, url in urls.items():
        r = s.get(url, timeout=60)
        r.raise_for_status()
        (args.out / f"{task_id}.mp4").write_bytes(r.content)
    print(
        json.dumps(
            {
                "tasks": len(task_ids),
                "videos": len(urls),
                "failed": len(failed),
                "polls": polls,
                "submit_s": round(first_submit_done - started, 3),
                "total_s": round(time.time() - started, 3),
            }
        )
    )
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
