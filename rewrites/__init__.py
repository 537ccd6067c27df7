"""The rule library: one file per rule, and the one ordered list the pipeline runs."""

from rewrites import (
    fft_to_dft,
    kv_cache_write,
    layernorm_channels,
    layout_bc1s,
    linear_to_conv1x1,
    rmsnorm_to_layernorm,
    sdpa_masked_rows,
    split_head_attention,
    split_wide_conv,
    split_wide_embedding,
    unfold_to_conv,
)

# Order matters: after the splits (below), the DSP front ends (FFTs and unfold, which coremltools cannot lower,
# become DFT projections and a strided convolution that the later rules shape; the FFT rule reads the window
# multiply before unfold is rewritten), then norms (their patterns read the graph as exported), then
# projections, cache writes (a KV cache written at consecutive positions becomes a slice write that attention
# reads), then attention (it reads q/k/v through the projections' layout ops), the channel norms, and finally
# the layout of everything in between, which removes the conversions the earlier rules left. An SDPA that
# stays fused is guarded against fully masked rows (this one runs on every compute unit). Projections and
# embedding tables wider than the Neural Engine's 16384 are split first: the splits add no layout op, so
# they stay when the never-worse guard rolls back the layout rules after them.
RULES = [
    split_wide_conv.RULE,
    split_wide_embedding.RULE,
    fft_to_dft.RULE,
    unfold_to_conv.RULE,
    rmsnorm_to_layernorm.RULE,
    linear_to_conv1x1.RULE,
    kv_cache_write.RULE,
    split_head_attention.RULE,
    sdpa_masked_rows.RULE,
    layernorm_channels.RULE,
    layout_bc1s.RULE,
]

__all__ = ["RULES"]
