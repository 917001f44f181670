"""The data flow's assets in order: catalog → reference images → rejections → requests → tasks →
videos → lineage. Each lives in its stage's module, beside that stage's checks."""

from .catalog import catalog, reference_images, rejections
from .lineage import lineage
from .requests import generation_requests
from .tasks import video_tasks
from .videos import videos

ALL_ASSETS = [catalog, reference_images, rejections, generation_requests, video_tasks, videos, lineage]
