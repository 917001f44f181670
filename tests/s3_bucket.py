"""A fresh bucket per test on the S3-compatible server ``VIDU_TEST_S3_ENDPOINT`` names (``.ci/run``
starts moto's; ``source .ci/s3.sh && s3_start`` for a laptop). Without it the tests skip with the
reason; in CI (``CI`` = 1/true) they fail instead, so a CI that lost its server cannot go green."""

from __future__ import annotations

import os
import uuid

import pytest
from postgres_db import in_ci


def s3_settings() -> dict[str, str]:
    """The AWS settings that point s3fs (and any child process) at the test server."""
    endpoint = os.environ.get("VIDU_TEST_S3_ENDPOINT", "").strip()
    if not endpoint:
        why = "VIDU_TEST_S3_ENDPOINT is not set: no S3-compatible server (.ci/run starts moto's)"
        if in_ci():
            pytest.fail(f"{why}; in CI the s3 tests must run")
        pytest.skip(why)
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
        "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
        "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
    }


def fresh_bucket(monkeypatch) -> str:
    """``s3://<new bucket>/dataset``; the AWS settings also apply in this process."""
    for name, value in s3_settings().items():
        monkeypatch.setenv(name, value)
    import s3fs

    bucket = f"vidu-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(bucket)
    return f"s3://{bucket}/dataset"
