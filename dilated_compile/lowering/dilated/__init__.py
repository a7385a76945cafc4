"""Dilated attention (docs/spec.md, "Dilated attention"): plan, forward/backward, eager function, custom op."""
