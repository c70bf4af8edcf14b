"""One pure-ASGI layer per concern. On the way in:
observe -> errors -> body_limit -> admin -> identity -> (jws -> trust_graph -> token_budget
-> content_safety, added by later layers) -> routes."""
