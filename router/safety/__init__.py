"""Content safety (SPEC.md §3): what a prompt or an output may contain, and who says so.

Pure data at the bottom (``verdict``: ceilings, findings, Azure's ``content_filter_result``
shape; ``texts``: the text of requests and replies; ``foundry``: Foundry's inline filter
results), one module per active provider behind one small interface (``local``: blocklists and
prompt-injection patterns with no network; ``content_safety``: Azure AI Content Safety), chosen
by one switch (``providers.build``). Per request, ``judge`` turns findings into decisions and
``guard`` checks the output as it passes; ``router.middleware.content_safety`` puts them in place.
"""
