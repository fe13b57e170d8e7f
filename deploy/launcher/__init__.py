"""The local launcher (`longtrace up`): composite config, process supervisor, orchestration, dashboard."""
