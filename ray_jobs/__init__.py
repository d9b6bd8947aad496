"""moeplace on Ray: sharded, exactly-once profiling jobs (``python -m ray_jobs.profile``; see docs/ray.md)."""
