"""moeplace: profiler."""
