"""Issue 15: the sensor orders a batch by Dagster's partition order without reading every
partition key on each tick. The order is kept per event storage between ticks; a tick reads
the keys added since the last one, and starts over when the storage changed under it.

Real parts: a Dagster instance on SQLite (``instance_for_test``); a second instance object
from the same ref stands for the daemon's fresh instance on the next tick.
"""

from __future__ import annotations

from dagster import DagsterInstance, instance_for_test

from vidu_pipeline.defs.partitions import REQUESTS_PARTITIONS_NAME as NAME
from vidu_pipeline.defs.sensors import partition_order


def truth(instance) -> dict[str, int]:
    return {k: i for i, k in enumerate(instance.get_dynamic_partitions(NAME))}


class Reads:
    """Counts the partition keys an instance hands out through the paginated reads."""

    def __init__(self, instance) -> None:
        self.keys = 0
        real = instance.get_paginated_dynamic_partitions

        def counted(*args, **kwargs):
            page = real(*args, **kwargs)
            self.keys += len(page.results)
            return page

        instance.get_paginated_dynamic_partitions = counted


def test_a_later_tick_reads_only_the_keys_planned_since(monkeypatch):
    monkeypatch.setattr("vidu_pipeline.defs.sensors.PartitionOrder.PAGE", 700)  # several pages at first
    with instance_for_test() as instance:
        first = [f"old-{i:05d}" for i in range(3_000)]
        instance.add_dynamic_partitions(NAME, first)
        reads = Reads(instance)
        batch = ["old-02999", "old-00007", "old-01500", "not-a-partition"]
        assert partition_order(instance).positions(instance, batch) == {k: truth(instance)[k] for k in batch[:3]}
        assert reads.keys >= 3_000

        # The next tick, as the daemon runs it: a new instance object on the same storage.
        later = [f"new-{i:03d}" for i in range(40)]
        instance.add_dynamic_partitions(NAME, later)
        with DagsterInstance.from_ref(instance.get_ref()) as next_tick:
            reads = Reads(next_tick)
            batch = ["new-039", "old-00001", "new-000"]
            order = partition_order(next_tick).positions(next_tick, batch)
            assert order == {k: truth(next_tick)[k] for k in batch}
            assert reads.keys == 40, "only the keys planned since the last tick are read"


def test_a_deleted_partition_makes_it_read_the_order_again():
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(NAME, [f"k-{i:03d}" for i in range(100)])
        order = partition_order(instance)
        assert order.positions(instance, ["k-050"]) == {"k-050": 50}
        instance.delete_dynamic_partition(NAME, "k-010")
        instance.delete_dynamic_partition(NAME, "k-099")
        got = order.positions(instance, ["k-050", "k-010", "k-098"])
        assert got == {"k-050": 49, "k-098": 97} == {k: v for k, v in truth(instance).items() if k in got}


def test_a_deleted_key_of_the_batch_is_noticed_in_the_middle_too():
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(NAME, [f"k-{i:03d}" for i in range(10)])
        order = partition_order(instance)
        order.positions(instance, ["k-001"])
        instance.delete_dynamic_partition(NAME, "k-004")
        assert order.positions(instance, ["k-004", "k-005"]) == {"k-005": 4}


def test_an_ephemeral_instance_gets_the_whole_order_each_time():
    with DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(NAME, ["a", "b", "c"])
        assert partition_order(instance).positions(instance, ["c", "a"]) == {"c": 2, "a": 0}
        instance.add_dynamic_partitions(NAME, ["d"])
        assert partition_order(instance).positions(instance, ["d"]) == {"d": 3}


def test_keys_planned_again_after_a_wipe_are_found():
    """Every key deleted and new ones planned: SQLite hands out storage ids from 1 again, below
    the kept cursor, so catching up finds nothing; the unknown batch ids make it read again."""
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(NAME, [f"k-{i:03d}" for i in range(10)])
        order = partition_order(instance)
        order.positions(instance, ["k-009"])
        for i in range(10):
            instance.delete_dynamic_partition(NAME, f"k-{i:03d}")
        instance.add_dynamic_partitions(NAME, ["x-0", "x-1", "k-009"])
        assert order.positions(instance, ["k-009", "x-1"]) == {"k-009": 2, "x-1": 1}
