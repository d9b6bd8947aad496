"""moeplace: placement."""
