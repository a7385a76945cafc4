"""Lowering of the attention strategies.

One subpackage per strategy (`dense`, `dilated`, `block_sparse`), each declared
once in its ``strategy.py`` and listed in `registry`; `ring` runs any of them
as the inner attention of sequence-parallel ring attention (one module per
inner kind); `common` holds what they share (fused block-attention kernels,
dense blocks, the Triton combine, log-sum-exp merge, custom-op support);
`reference` is the float64 reference the tests compare against.

Two implementations per strategy, by design: the function a site with static
lengths becomes (`dilated.attention`, `block_sparse.attention`,
`ring.attention`) is plain PyTorch that AOTAutograd traces, so Inductor fuses
the spread and merge around the attention kernels, generates FlexAttention's
Triton template for block-sparse attention on GPU, and schedules and overlaps
the ring's functional collectives with compute; the custom op a site with a
symbolic length becomes (`dilated.op`, `block_sparse.op`, `ring.op`) is opaque
to Inductor (no guard on the length, one graph for every length) and runs the
same lowering eagerly at run time, with an explicit backward from the saved
output and log-sum-exp. Making the static path call the op would lose that
fusion and overlap; making the op traceable would add guards on the length.
Where nothing is lost they are one: dilated attention on CUDA (fp16, bf16,
fp32) is the op on both paths (except, with ``DILATED_INLINE=on``, where its
Triton work list runs and Inductor compiles the graph: then the graph
launches the work list's kernels itself, `dilated.inline`), and each op's
forward and backward run the static path's own forward/backward functions
(`dilated.compute`, `block_sparse.gather`/`flex`,
`ring.dense`/`dilated`/`block_exchange`).
"""
