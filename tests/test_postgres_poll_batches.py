"""Poll answers recorded in batches (issue 15), on a real PostgreSQL server: the same tests as
on SQLite (tests/test_ledger.py), where the batch's rows are read ``FOR UPDATE`` and each kind
of answer is one executemany whose row count the driver reports.
"""

from __future__ import annotations

import pytest
from postgres_db import fresh_database
from test_ledger import (  # noqa: F401  (pytest collects the imported tests and fixtures here)
    clock,
    planned,
    test_a_batch_of_only_stale_answers_changes_nothing,
    test_a_batch_of_poll_answers_applies_each_like_a_single_answer_in_one_commit,
    test_a_batch_takes_one_answer_per_request_each_naming_its_task,
    test_a_late_answer_about_an_old_task_is_a_reported_no_op,
    test_record_poll,
    test_retryable_failed_leaves_out_failures_that_are_final,
)

from vidu_pipeline.ledger import Ledger

pytestmark = pytest.mark.postgres


@pytest.fixture
def ledger(clock):  # noqa: F811
    with fresh_database() as url:
        led = Ledger(url, clock=clock)
        led.plan(planned(i) for i in range(5))
        yield led
        led.close()
