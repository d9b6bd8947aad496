"""``moeplace serve``: a long-running service that follows live routing and re-plans with few expert moves.

state (STATE_DIR files: plan versions, ledger, checkpoint) -> window (decayed routing counts) -> ingest (watched
dataset shards, posted observations) -> service (``ReplanService``: decisions through placement.replan) ->
prom (Prometheus metrics) -> app (the FastAPI routes) -> rayserve (the same app as a Ray Serve application).
Nothing starts at import; ``create_app`` builds the app.
"""
