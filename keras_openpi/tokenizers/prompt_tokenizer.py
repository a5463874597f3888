"""openpi's prompt layouts (π0 and π0.5), shared by every prompt tokenizer."""

import abc
import warnings

import numpy as np


def clean_prompt(prompt):
    """openpi's prompt cleaning: strip; `_` and newlines become spaces (case kept)."""
    return prompt.strip().replace("_", " ").replace("\n", " ")


def discretize_state(state):
    """π0.5's state bins: 256 equal bins on [-1, 1] (below -1 gives -1, above 1 gives 255).

    `np.digitize(state, np.linspace(-1, 1, 257)[:-1]) - 1`, as openpi.

    Example:
    >>> discretize_state(np.array([-1.0, 0.0, 0.999, 1.5])).tolist()
    [0, 128, 255, 255]
    """
    bins = np.linspace(-1.0, 1.0, 256 + 1)[:-1]
    return np.digitize(np.asarray(state), bins=bins) - 1


class PromptTokenizer(abc.ABC):
    """Lays out prompts as openpi's `PaligemmaTokenizer` does, over any subword encoding.

    π0: `encode(cleaned, add_bos=True) + encode("\\n")` (the newline is the
    start-of-answer token). π0.5 with a state: `"Task: {cleaned}, State: {bins};\\nAction: "`
    with BOS, where `bins` are the space-separated `discretize_state` ids of
    the normalized, unpadded state. Ids are right-padded with 0 to `max_len`
    (mask False there) or truncated to it with a warning.

    Subclasses define `_encode(text, add_bos) -> list[int]` and `decode(ids)`.

    Args:
        max_len: the token length L (the model's `max_token_len`).
    """

    def __init__(self, max_len=48):
        if int(max_len) < 1:
            raise ValueError(f"'max_len' must be at least 1, got {max_len}.")
        self.max_len = int(max_len)

    @abc.abstractmethod
    def _encode(self, text, add_bos=False):
        """The ids of `text` (a list of ints), without cleaning or padding."""

    @abc.abstractmethod
    def decode(self, ids):
        """The text of `ids`, padding and special ids dropped."""

    def prompt_ids(self, prompt, state=None):
        """The unpadded ids of `prompt` (π0 format), or of prompt and state (π0.5 format)."""
        if not isinstance(prompt, str):
            raise ValueError(f"'prompt' must be a str, got {type(prompt).__name__}.")
        cleaned = clean_prompt(prompt)
        if state is None:
            return self._encode(cleaned, add_bos=True) + self._encode("\n")
        state = np.asarray(state)
        if state.ndim != 1:
            raise ValueError(f"'state' must have shape (s,), got shape {state.shape}.")
        bins = " ".join(str(int(b)) for b in discretize_state(state))
        return self._encode(f"Task: {cleaned}, State: {bins};\nAction: ", add_bos=True)

    def tokenize(self, prompt, state=None):
        """openpi's `tokenize`: `(ids (L,) int32, mask (L,) bool)` with L = `max_len`.

        Args:
            prompt: the task instruction.
            state: π0.5's normalized, unpadded (s,) state, or None for π0.
        """
        ids = self.prompt_ids(prompt, state)
        if len(ids) > self.max_len:
            warnings.warn(
                f"the prompt has {len(ids)} tokens, more than max_len {self.max_len}: it is "
                "truncated. Consider a larger max_token_len if this happens often.",
                UserWarning,
                stacklevel=2,
            )
            ids = ids[: self.max_len]
        tokens = np.zeros(self.max_len, dtype=np.int32)
        tokens[: len(ids)] = ids
        return tokens, np.arange(self.max_len) < len(ids)

    def tokenize_batch(self, prompts, states=None):
        """`tokenize` over a list: `(ids (B, L), mask (B, L))`."""
        states = [None] * len(prompts) if states is None else states
        pairs = [self.tokenize(p, s) for p, s in zip(prompts, states)]
        return np.stack([ids for ids, _ in pairs]), np.stack([mask for _, mask in pairs])
