"""Load tests for DAS Serve: Locust scenarios, `make loadtest` and the hot-swap-under-load scenario."""
