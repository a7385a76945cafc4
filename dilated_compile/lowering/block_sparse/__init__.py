"""Block-sparse attention (docs/spec.md, "Block-sparse attention"): patterns, FlexAttention and gathered lowerings,
eager function, custom op."""
