"""The engine: config, calls, scrub policy, fingerprints, progress markers, stall rules,
session stores and the adapter contract. It knows nothing of HTTP, OTel or any protocol."""
