"""Block-sparse attention (SPEC section 4): patterns, FlexAttention and gathered lowerings,
eager function, custom op."""
