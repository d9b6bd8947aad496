"""moeplace: ray_jobs."""
