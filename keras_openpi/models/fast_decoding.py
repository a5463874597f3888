"""π0-FAST's decoding layout, as openpi lays it out: right-aligned prefix, contiguous key range."""

from keras import ops


def left_to_right_align(tokens, input_mask, attention_mask):
    """Rolls each example so that its last valid token ends the sequence (openpi's `left_to_right_align`).

    Example b is rolled by `-(last valid index + 1)`: the invalid tail (text
    padding) moves to the front, everything else keeps its order. The
    attention mask is rolled on both axes.

    Args:
        tokens: (B, P, D) prefix embeddings.
        input_mask: (B, P) bool.
        attention_mask: (B, P, P) bool.

    Returns:
        The three inputs, rolled.

    Example: a row with input mask `[1 1 0 1 0 0]` (last valid index 3) is
    rolled by -4 to `[0 0 1 1 0 1]`.
    """
    length = input_mask.shape[1]
    index = ops.arange(length, dtype="int32")
    last = ops.max(ops.where(input_mask, index[None, :], 0), axis=1)
    source = (index[None, :] + last[:, None] + 1) % length  # (B, P)
    tokens = ops.take_along_axis(tokens, source[:, :, None], axis=1)
    input_mask = ops.take_along_axis(input_mask, source, axis=1)
    attention_mask = ops.take_along_axis(attention_mask, source[:, :, None], axis=1)
    attention_mask = ops.take_along_axis(attention_mask, source[:, None, :], axis=2)
    return tokens, input_mask, attention_mask


def decode_step_mask(prefix_start, end, cache_size):
    """The (B, 1, S) mask of one decoded token: key slots `prefix_start[b] <= s < end`.

    openpi's decode step attends to this contiguous range of its
    preallocated cache, not to the prefix's input mask: after
    `left_to_right_align` the range starts `prefill_len` slots before the
    prefix's end, so masked slots between valid tokens (a masked camera) are
    inside it and as many valid slots at its start are outside.

    Args:
        prefix_start: (B,) int, `prefill_size - prefill_len`.
        end: scalar int, one past the slot of the token being decoded.
        cache_size: S, the preallocated cache length.
    """
    slots = ops.arange(cache_size, dtype="int32")[None, None, :]
    return ops.logical_and(slots >= prefix_start[:, None, None], slots < end)
