"""The recipe's garbage collection at fixed steps (psilora_ds.recipe.garbage): between start and close Python's
automatic collector is off and setup's objects are frozen, a collection runs exactly at the multiples of ``every``,
and close puts the collector back as it was; every = 0 leaves Python's collector alone."""

import gc

import pytest

from psilora_ds.recipe.garbage import StepGarbageCollection


class Cycle:
    def __init__(self):
        self.me = self


def test_collections_at_fixed_steps_only_between_start_and_close():
    assert gc.isenabled()
    collector = StepGarbageCollection(3)
    collector.start()
    try:
        assert not gc.isenabled() and gc.get_freeze_count() > 0
        counts = []
        for step in range(1, 10):
            collector.after_step(step)
            counts.append(collector.collections)
        assert counts == [0, 0, 1, 1, 1, 2, 2, 2, 3]  # steps 3, 6 and 9
    finally:
        collector.close()
    assert gc.isenabled() and gc.get_freeze_count() == 0
    collector.close()  # (twice: nothing more)
    assert gc.isenabled()


def test_every_zero_leaves_python_alone_and_a_negative_one_is_refused():
    collector = StepGarbageCollection(0)
    collector.start()
    assert gc.isenabled() and gc.get_freeze_count() == 0
    collector.after_step(50)
    assert collector.collections == 0
    collector.close()
    with pytest.raises(ValueError, match="every must be >= 0"):
        StepGarbageCollection(-1)


def test_a_collection_frees_the_cycles_made_since_the_last_one():
    import weakref

    collector = StepGarbageCollection(2)
    collector.start()
    try:
        cycle = Cycle()
        ref = weakref.ref(cycle)
        del cycle
        collector.after_step(1)
        assert ref() is not None  # automatic collection is off: the cycle waits
        collector.after_step(2)
        assert ref() is None
    finally:
        collector.close()
