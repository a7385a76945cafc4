"""Dilated attention (SPEC section 3): plan, forward/backward, eager function, custom op."""
