"""Plain tensor functions that rewritten graphs call (token selection, WPR, head filter,
similarity selection, merging). Each module is importable on its own; import from the
module (``from vitprune.ops.token_select import topk_keep``)."""
