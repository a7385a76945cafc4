"""Ring attention (docs/spec.md, "Ring attention"): one module per inner kind, the entry points and the custom op."""
