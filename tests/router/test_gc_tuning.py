"""The collector settings ``kars router`` applies to its process (``router.gc_tuning``)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from router import gc_tuning


class _Node:
    """A container object that can point at itself: garbage only the collector can free."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def interpreter_defaults() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("interpreter_defaults")
def test_threshold_raises_the_youngest_generation_only() -> None:
    _, gen1, gen2 = gc.get_threshold()
    gc_tuning.set_threshold(10_000)
    assert gc.get_threshold() == (10_000, gen1, gen2)
    gc_tuning.set_threshold(0)  # 0 keeps what is set
    assert gc.get_threshold() == (10_000, gen1, gen2)


@pytest.mark.usefixtures("interpreter_defaults")
def test_freeze_frees_garbage_and_keeps_the_living_out_of_collections() -> None:
    dropped = _Node()
    dropped_ref = weakref.ref(dropped)
    kept = _Node()
    del dropped

    gc_tuning.freeze()
    assert dropped_ref() is None  # collected first, not frozen with the rest
    assert gc.get_freeze_count() > 0
    assert not any(o is kept for o in gc.get_objects())  # no collection walks it any more

    # A frozen object that becomes a garbage cycle (a policy snapshot replaced by a reload) is
    # out of reach of ordinary collections, and freed by the next freeze (after the reload).
    kept_ref = weakref.ref(kept)
    del kept
    gc.collect()
    assert kept_ref() is not None
    gc_tuning.freeze()
    assert kept_ref() is None
