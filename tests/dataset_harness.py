"""A small sweep run through Dagster (`materialize`, the task sensor, the simulator in-process),
with render defects injected through the simulator's fault flags: shared by the dataset tests."""

import dataclasses
import shutil
from pathlib import Path

from dagster import AssetKey, materialize
from support import drive_sensor

from vidu_pipeline.defs.assets import ALL_ASSETS
from vidu_pipeline.defs.checks import ALL_CHECKS
from vidu_pipeline.defs.dataset import DATASET_ASSETS, DATASET_CHECKS
from vidu_pipeline.defs.partitions import REQUESTS_PARTITIONS_NAME
from vidu_pipeline.defs.resources import PipelineResource, ViduResource
from vidu_pipeline.generation_requests import RequestSpec
from vidu_pipeline.simulator import Simulator, SimulatorConfig
from vidu_pipeline.simulator.faults import FaultConfig, pick_defect

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "catalog"
SCALE = 0.1
KEY = "test-key"
CAT_PROMPT = "The cat turns its head slowly towards the camera and blinks, soft window light."
COFFEE_PROMPT = "Steam rises from the coffee cup on a wooden table, a slow orbit around the cup."
# Two subjects, each asked for small and large movement: 4 requests per seed.
PROMPTS = [
    ("cat", CAT_PROMPT, "small"),
    ("cat", CAT_PROMPT, "large"),
    ("coffee", COFFEE_PROMPT, "small"),
    ("coffee", COFFEE_PROMPT, "large"),
]


def make_catalog(root: Path, prompts=PROMPTS, seeds=(1, 2), quality: str = "") -> Path:
    """The sample catalog's images with our own prompts and sweep (16:9, no music)."""
    catalog = root / "catalog"
    shutil.copytree(SAMPLE, catalog)
    lines = ["subject_id,prompt,aspect_ratio,movement_amplitude,bgm,duration,resolution"]
    lines += [f'{s},"{p}",16:9,{a},false,,' for s, p, a in prompts]
    (catalog / "prompts.csv").write_text("\n".join(lines) + "\n")
    (catalog / "sweep.yaml").write_text(f"seeds: [{', '.join(map(str, seeds))}]\n{quality}")
    return catalog


def run(instance, resources, selection, **kw):
    return materialize(
        [*ALL_ASSETS, *ALL_CHECKS, *DATASET_ASSETS, *DATASET_CHECKS],
        selection=[AssetKey(s) for s in selection],
        instance=instance,
        resources=resources,
        **kw,
    )


def plan(instance, resources) -> list[str]:
    """Plan the catalog's requests (no API call); their request ids."""
    run(instance, resources, ["catalog", "reference_images", "generation_requests"])
    return sorted(instance.get_dynamic_partitions(REQUESTS_PARTITIONS_NAME))


def request_bodies(pipeline: PipelineResource) -> dict[str, dict]:
    """The submit body each planned request will send (what the simulator decides defects on)."""
    cache = pipeline.image_cache()
    return {
        row.request_id: RequestSpec.from_json(row.spec_json).to_request(cache.data_uri).to_payload()
        for row in pipeline.ledger().rows()
    }


def faults_hitting(pipeline: PipelineResource, defect: str, wanted, rate: float = 0.3) -> tuple[FaultConfig, set]:
    """A fault config (its dice seed searched) under which the ``defect`` hits a set of requests
    that ``wanted(hit_ids, specs)`` accepts; returns it with the requests hit."""
    bodies = request_bodies(pipeline)
    specs = {r.request_id: RequestSpec.from_json(r.spec_json) for r in pipeline.ledger().rows()}
    for seed in range(500):
        config = FaultConfig(seed=seed, **{f"defect_{defect}": rate})
        hit = {rid for rid, body in bodies.items() if pick_defect(config, body) == defect}
        if wanted(hit, specs):
            return config, hit
    raise AssertionError(f"no fault seed gives the wanted {defect} hits")


def sweep(tmp_path: Path, instance, *, faults=None, choose=None, catalog: Path | None = None):
    """Plan, start a simulator with ``faults`` (or ``choose(pipeline) -> (faults, hit)``), submit,
    drive the sensor until every request has its video, then lineage and the export with its
    checks. Returns (pipeline, export result, requests hit by the defect)."""
    catalog = catalog or make_catalog(tmp_path)
    pipeline = PipelineResource(data_dir=str(tmp_path / "data"), catalog_dir=str(catalog), poll_time_budget_s=10)
    placeholder = {"pipeline": pipeline, "vidu": ViduResource(api_key=KEY, base_url="http://127.0.0.1:9")}
    keys = plan(instance, placeholder)
    hit: set = set()
    if choose is not None:
        faults, hit = choose(pipeline)
    config = SimulatorConfig(
        api_key=KEY,
        latency_s=0.3,
        concurrency=8,
        render_scale=SCALE,
        state_dir=tmp_path / "sim",
        faults=faults or FaultConfig(),
    )
    with Simulator(config) as sim:
        resources = {"pipeline": pipeline, "vidu": ViduResource(api_key=KEY, base_url=sim.base_url)}
        tags = {"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]}
        run(instance, resources, ["video_tasks"], tags=tags)
        drive_sensor(instance, resources, pipeline)
        run(instance, resources, ["lineage"])
        result = run(instance, resources, ["dataset_export"])
    return pipeline, result, hit


@dataclasses.dataclass
class Gate:
    passed: bool
    failing: list[str]
    metadata: dict


def gates(result) -> dict[str, Gate]:
    """The export's checks by name: passed, the failing request ids, the metadata."""
    out = {}
    for evaluation in result.get_asset_check_evaluations():
        meta = {k: v.value for k, v in evaluation.metadata.items()}
        out[evaluation.check_name] = Gate(evaluation.passed, list(meta["failing_request_ids"]), meta)
    return out
