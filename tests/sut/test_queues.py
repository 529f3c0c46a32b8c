"""Scenario queues: order and unit of admission per scenario."""
import threading

import pytest

from wallperf.sut.queues import MultiStreamQueue, OfflineQueue, ScenarioQueue, WorkItem, queue_for


def items(*indices):
    return [WorkItem(query_id=100 + i, sample_index=i) for i in indices]


def test_fifo_keeps_arrival_order_and_respects_free_slots():
    q = ScenarioQueue()
    q.put(items(3, 1))
    q.put(items(2))
    assert [it.sample_index for it in q.take(2)] == [3, 1]
    assert [it.sample_index for it in q.take(5)] == [2]
    assert q.take(5) == []


def test_offline_sorts_by_prompt_length():
    lengths = [50, 10, 30, 20]
    q = OfflineQueue(lengths)
    q.put(items(0, 1, 2, 3))
    assert [it.sample_index for it in q.take(3)] == [1, 3, 2]
    assert len(q) == 1


def test_multistream_admits_whole_groups_only():
    q = MultiStreamQueue()
    q.put(items(0, 1, 2))
    q.put(items(3, 4, 5))
    assert q.take(2) == []
    assert [it.sample_index for it in q.take(5)] == [0, 1, 2]
    assert [it.sample_index for it in q.take(6)] == [3, 4, 5]


def test_wait_wakes_on_put():
    q = ScenarioQueue()
    woke = threading.Event()

    def waiter():
        q.wait(5.0)
        woke.set()

    t = threading.Thread(target=waiter)
    t.start()
    q.put(items(0))
    t.join(2.0)
    assert woke.is_set()


@pytest.mark.parametrize("name,cls", [("Offline", OfflineQueue), ("MultiStream", MultiStreamQueue),
                                      ("Server", ScenarioQueue), ("Interactive", ScenarioQueue),
                                      ("SingleStream", ScenarioQueue)])
def test_queue_for_each_scenario(name, cls):
    assert type(queue_for(name, [1])) is cls


def test_queue_for_unknown_scenario():
    with pytest.raises(ValueError, match="unknown scenario"):
        queue_for("Batch", [])
