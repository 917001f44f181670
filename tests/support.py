"""Small builders shared by the test modules: images and submit bodies made on the spot."""

import base64
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def run_cli(*args: str, cwd: Path, env: dict, timeout: float, stdin=None) -> subprocess.CompletedProcess:
    """``vidu-pipeline …`` in a subprocess, as a user runs it, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "vidu_pipeline.cli", *args],
        cwd=cwd,
        env=env,
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def image_bytes(width: int, height: int, fmt: str = "PNG", colour=(200, 60, 40)) -> bytes:
    """A striped image, so the simulator's pans and zooms change pixels."""
    im = Image.new("RGB", (width, height), colour)
    for x in range(0, width, 16):
        im.paste((x % 255, 255 - x % 255, 90), (x, 0, x + 8, height))
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def data_uri(data: bytes, subtype: str = "png") -> str:
    return f"data:image/{subtype};base64,{base64.b64encode(data).decode()}"


IMG_A = data_uri(image_bytes(320, 240))
IMG_B = data_uri(image_bytes(200, 300, "JPEG", (30, 90, 200)), "jpeg")


def body(**overrides) -> dict:
    return {"images": [IMG_A, IMG_B], "prompt": "a red kite over blue hills", **overrides}


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **kw)
    return out.getvalue()


def photo(w: int = 200, h: int = 150, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A small image with some structure, distinct per seed."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
    return Image.fromarray(base, "RGB").resize((w, h), Image.Resampling.BILINEAR).convert(mode)


def png(w=200, h=150, seed=0) -> bytes:
    return encode(photo(w, h, seed))


def fill(disk: Path) -> Path:
    """Write zeros until the file system says it is full (ENOSPC); the filler's path."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


SENSOR_JOBS = {"vidu_submit_job", "vidu_collect_job", "vidu_lineage_job"}


def drive_sensor(instance, resources, pipeline, *, timeout: float = 120) -> set[str]:
    """The CLI's driver ticking the task sensor and executing the runs it asks for, each
    tick's runs before the next, until every request has ended; the run keys it asked for
    (never one twice, only the sensor's named jobs, every run successful)."""
    from vidu_pipeline.cli.driver import Driver

    ledger = pipeline.ledger()

    def settled() -> bool:
        rows = ledger.rows()
        return all(r.state in ("succeeded", "failed", "unknown") for r in rows) and all(
            r.video_sha256 for r in rows if r.state == "succeeded"
        )

    driver = Driver(instance, pipeline, resources["vidu"])
    try:
        finished = driver.drive(settled, timeout_s=timeout)
    finally:
        driver.close(interrupted=False)
    assert not driver.repeated_run_keys, f"the sensor asked for the same batch twice: {driver.repeated_run_keys}"
    assert set(driver.jobs_by_run_key.values()) <= SENSOR_JOBS, driver.jobs_by_run_key
    assert not driver.failed_runs, driver.failed_runs
    assert finished, f"not finished: {ledger.counts_by_state()}"
    return set(driver.jobs_by_run_key)


def plan_catalog(root: Path, *, prompts: int = 1, **settings):
    """A drill catalog of one subject and ``prompts`` prompts under ``root``, planned through
    Dagster (ledger rows, partitions, the image cache): the pipeline resource and request ids.
    ``settings`` are PipelineResource fields (e.g. another ``data_dir``)."""
    from dagster import AssetKey, instance_for_test, materialize

    from drills.run_drill import make_catalog
    from vidu_pipeline.defs.assets import ALL_ASSETS
    from vidu_pipeline.defs.resources import PipelineResource, ViduResource

    make_catalog(root / "catalog", subjects=1, prompts=prompts, seeds=1)
    settings = {"data_dir": str(root / "data"), "catalog_dir": str(root / "catalog"), **settings}
    pipeline = PipelineResource(**settings)
    with instance_for_test() as instance:
        result = materialize(
            ALL_ASSETS,
            selection=[AssetKey(k) for k in ("catalog", "reference_images", "generation_requests")],
            instance=instance,
            resources={"pipeline": pipeline, "vidu": ViduResource()},
        )
    return pipeline, list(result.output_for_node("generation_requests")["request_id"])
