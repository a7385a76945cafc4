"""Ring attention (SPEC section 5): one module per inner kind, the entry points and the custom op."""
