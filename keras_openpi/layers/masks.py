"""The block-causal attention mask of π0 and big_vision."""

from keras import ops


def make_attention_mask(input_mask, ar_mask):
    """Builds a (B, T, T) boolean attention mask from token masks.

    Tokens are grouped into blocks by `ar_mask`: a token with `ar_mask` true
    starts a new block. A token attends to every valid token of its own block
    and of all earlier blocks, never to later blocks:
    `attend[b, i, j] = cumsum(ar)[b, j] <= cumsum(ar)[b, i]` and both tokens valid.

    Examples (one sequence, `input_mask` all true):
        ar_mask [0 0 0 0] -> full bidirectional attention (a prefix-LM prefix).
        ar_mask [1 1 1 1] -> causal attention.
        ar_mask [0 0 1 1 0] -> tokens 0-1 see each other; token 2 sees 0-2;
            tokens 3-4 form a block that sees everything.

    Args:
        input_mask: (B, T) bool, true on valid tokens.
        ar_mask: (B, T) or (T,) bool/int, true where a new causal block starts.

    Returns:
        (B, T, T) bool.
    """
    input_mask = ops.cast(input_mask, "bool")
    ar = ops.cast(ar_mask, "int32")
    ar = ops.broadcast_to(ar, ops.shape(input_mask))
    cumsum = ops.cumsum(ar, axis=1)
    attend = cumsum[:, None, :] <= cumsum[:, :, None]
    valid = ops.logical_and(input_mask[:, None, :], input_mask[:, :, None])
    return ops.logical_and(attend, valid)
