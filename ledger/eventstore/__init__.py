"""The event store: append-only streams, their hash chains, the commit order, group commit and group read."""
