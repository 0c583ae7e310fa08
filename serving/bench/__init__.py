"""``superbrain bench``: W1/W2/W3 against the gRPC limit and Ray Serve's own ingress modes (docs/benchmarks.md)."""
