"""Read-only query API for analysts."""
