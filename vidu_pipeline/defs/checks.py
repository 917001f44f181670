"""Asset checks: what a dataset user must know before trusting the output. Each lives in its
stage's module, beside the asset it checks."""

from .catalog import images_accepted
from .lineage import lineage_complete, no_unknown_tasks, videos_match_requests
from .videos import videos_verified

ALL_CHECKS = [images_accepted, lineage_complete, videos_match_requests, no_unknown_tasks, videos_verified]
