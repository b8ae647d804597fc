"""Model implementations, their registry and weight loading (imported lazily: they need torch)."""
