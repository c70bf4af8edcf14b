"""The garbage collector tuned for a long-running proxy process (``kars router`` only).

CPython collects its youngest generation after every 700 net allocations of container objects.
A proxied request allocates and frees hundreds (scope, headers, closures, coroutines, the parsed
JSON bodies), and with 32 requests in flight the count climbs past 700 every few requests even
though reference counting frees nearly all of it: each collection then walks the live requests,
promotes them, and every ~10 of those trigger collections of the older generations, up to a full
walk of the whole heap: ~85,000 objects built at start (modules, compiled policy, clients), ~50 ms
with the event loop stopped. Measured on the inference hot path at the defaults: ~9% of the
router's instructions in the collector (bench/README.md, "instructions").

Two changes, both process-wide, so the command that owns the process applies them (tests and other
embedders of ``build_app`` keep the interpreter's defaults):

- ``server.gcThreshold`` raises the youngest generation's threshold (default 10,000, from 700):
  the same garbage is found, with one walk over the requests in flight where there were ~14.
- ``server.gcFreeze`` moves everything alive once the router is ready into the permanent
  generation (``gc.freeze()``), so no collection walks the start-up heap again. After each policy
  reload the heap is unfrozen, collected once (cycles in the snapshot just replaced are freed
  there, not leaked) and frozen again: one full collection per reload instead of one every few
  thousand requests.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger("kars.gc")


def set_threshold(gen0: int) -> None:
    """Collect the youngest generation after ``gen0`` net allocations (0 keeps the interpreter's)."""
    if gen0 > 0:
        _, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(gen0, gen1, gen2)


def freeze() -> None:
    """Collect everything once, then keep what is left out of every later collection."""
    start = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    elapsed_ms = (time.perf_counter() - start) * 1000
    log.info("garbage collector: %d objects frozen in %.1f ms", gc.get_freeze_count(), elapsed_ms)
