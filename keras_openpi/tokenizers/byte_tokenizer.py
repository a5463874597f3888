"""A byte-level prompt tokenizer that needs no vocabulary file (demos and tests)."""

import numpy as np

from keras_openpi.tokenizers.prompt_tokenizer import PromptTokenizer

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
BYTE_OFFSET = 3  # byte b has id b + 3


class ByteTokenizer(PromptTokenizer):
    """Encodes prompts as UTF-8 bytes, in openpi's π0 / π0.5 prompt layouts.

    The layout is `PromptTokenizer`'s (openpi's `PaligemmaTokenizer`): BOS, the
    cleaned prompt and the start-of-answer `"\\n"` (π0), or the π0.5 text with
    the discretized state; right-padded with 0 to `max_len` or truncated with
    a warning. Ids are `0` pad, `1` BOS, `2` EOS and `3 + byte`, so a model
    needs only `vocabulary_size = 259` embedding rows.

    Args:
        max_len: the fixed token length L (the model's `max_token_len`).

    Example:
    >>> tokenizer = ByteTokenizer(max_len=8)
    >>> ids, mask = tokenizer.tokenize("go")
    >>> ids.tolist(), mask.tolist()
    ([1, 106, 114, 13, 0, 0, 0, 0], [True, True, True, True, False, False, False, False])
    >>> tokenizer.decode(ids)
    'go'
    """

    vocabulary_size = BYTE_OFFSET + 256

    def _encode(self, text, add_bos=False):
        return [BOS_ID] * add_bos + [BYTE_OFFSET + b for b in text.encode("utf-8")]

    def decode(self, ids):
        """The cleaned prompt back from ids (special ids and the final `"\\n"` dropped)."""
        data = bytes(int(i) - BYTE_OFFSET for i in np.asarray(ids).ravel() if i >= BYTE_OFFSET)
        text = data.decode("utf-8", errors="replace")
        return text[:-1] if text.endswith("\n") else text
