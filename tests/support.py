"""Small builders shared by the test modules: images and submit bodies made on the spot."""

import base64
import io
from pathlib import Path

import numpy as np
from PIL import Image


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


def drive_sensor(instance, resources, pipeline, *, timeout: float = 120) -> set[str]:
    """Evaluate the task sensor and execute the named job each request asks for, as the daemon
    would, until every request has ended; the run keys it asked for (never one twice)."""
    import time

    from dagster import build_sensor_context

    from vidu_pipeline.definitions import build_definitions
    from vidu_pipeline.defs.sensors import vidu_task_sensor

    defs = build_definitions(resources=resources)
    seen: set[str] = set()
    ledger = pipeline.ledger()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = vidu_task_sensor(build_sensor_context(instance=instance, resources=resources))
        for req in result.run_requests or []:
            assert req.run_key not in seen, "the sensor asked for the same batch twice"
            assert req.job_name in {"vidu_submit_job", "vidu_collect_job", "vidu_lineage_job"}, req
            seen.add(req.run_key)
            defs.resolve_job_def(req.job_name).execute_in_process(
                instance=instance, tags=dict(req.tags), run_config=req.run_config
            )
        rows = ledger.rows()
        if all(r.state in ("succeeded", "failed", "unknown") for r in rows) and all(
            r.video_sha256 for r in rows if r.state == "succeeded"
        ):
            return seen
        time.sleep(0.3)
    raise AssertionError(f"not finished: {ledger.counts_by_state()}")


def plan_catalog(root: Path, *, prompts: int = 1):
    """A drill catalog of one subject and ``prompts`` prompts under ``root``, planned through
    Dagster (ledger rows, partitions, the image cache): the pipeline resource and request ids."""
    from dagster import AssetKey, instance_for_test, materialize

    from drills.run_drill import make_catalog
    from vidu_pipeline.defs.assets import ALL_ASSETS
    from vidu_pipeline.defs.resources import PipelineResource, ViduResource

    make_catalog(root / "catalog", subjects=1, prompts=prompts, seeds=1)
    pipeline = PipelineResource(data_dir=str(root / "data"), catalog_dir=str(root / "catalog"))
    with instance_for_test() as instance:
        result = materialize(
            ALL_ASSETS,
            selection=[AssetKey(k) for k in ("catalog", "reference_images", "generation_requests")],
            instance=instance,
            resources={"pipeline": pipeline, "vidu": ViduResource()},
        )
    return pipeline, list(result.output_for_node("generation_requests")["request_id"])
