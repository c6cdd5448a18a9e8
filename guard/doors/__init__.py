"""The front doors: reverse proxy, ASGI middleware, in-process Guard and replay, all
driving one Exchange per request over the engine."""
