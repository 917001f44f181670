"""One dynamic partition per generation request; the key is the request id (see plan.py)."""

from dagster import DynamicPartitionsDefinition

REQUESTS_PARTITIONS_NAME = "vidu_requests"
requests_partitions = DynamicPartitionsDefinition(name=REQUESTS_PARTITIONS_NAME)

# Dagster advises at most 100,000 partitions per asset; planning warns past this.
PARTITION_SOFT_LIMIT = 100_000
