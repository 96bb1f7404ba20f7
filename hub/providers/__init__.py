"""The providers behind the hub: the native one in process, external ones over HTTP, and the egress rules."""
