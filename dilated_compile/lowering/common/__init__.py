"""Fused block-attention kernels and what the strategies share: dense blocks, the Triton
combine and its wrapper, log-sum-exp merge, argument checks, custom-op support."""
