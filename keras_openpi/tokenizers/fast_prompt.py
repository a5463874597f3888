"""π0-FAST's token sequence: prompt and state as text, then FAST action tokens."""

import logging
import pathlib

import numpy as np

from keras_openpi.tokenizers.fast import FASTDecodeError
from keras_openpi.tokenizers.fast import FASTTokenizer
from keras_openpi.tokenizers.prompt_tokenizer import discretize_state
from keras_openpi.tokenizers.sentencepiece_model import SentencePieceModel

logger = logging.getLogger(__name__)

ACTION_PREFIX = "Action: "
ACTION_END = "|"
# The files of `FASTPromptTokenizer.save`.
SENTENCEPIECE_FILE = "paligemma_tokenizer.model"
FAST_DIRECTORY = "fast"


class FASTPromptTokenizer:
    """Lays out π0-FAST's tokens exactly as openpi's `FASTTokenizer.tokenize`.

    The sequence is a prefix and, for training, a postfix:

    - prefix: BOS + `"Task: {prompt}, State: {bins};\\n"`, where the prompt is
      lower-cased, stripped, `_` → space, and `bins` are the space-separated
      256-bin `discretize_state` ids of the normalized state. Bidirectional
      (AR mask 0), no loss.
    - postfix (only when actions are given): `"Action: "`, the FAST tokens of
      the action chunk mapped into the top of the PaliGemma vocabulary,
      then `"|"` and EOS. Causal (AR mask 1), with loss.

    Action token `fast_id` becomes PaliGemma id
    `vocabulary_size - 1 - skip_tokens - fast_id`: openpi skips PaliGemma's
    last 128 tokens (`<seg>` tokens) and counts down through the `<loc>`
    tokens. Everything is right-padded with 0 (False) to `max_len`, or
    truncated to it with a logged warning.

    Args:
        model_path: the PaliGemma SentencePiece `.model` file (nothing is
            downloaded; see `PaliGemmaTokenizer`).
        fast_tokenizer: a fitted `FASTTokenizer`, or the directory of one
            (e.g. a local copy of `physical-intelligence/fast`).
        max_len: the token length L (π0-FAST's `max_token_len`; openpi's
            default config uses 250).
        skip_tokens: how many tokens at the top of the PaliGemma vocabulary
            the action tokens skip (openpi: 128).

    Example:
    >>> tokenizer = FASTPromptTokenizer("paligemma_tokenizer.model", "fast/")  # doctest: +SKIP
    >>> tokens, token_mask, ar_mask, loss_mask = tokenizer.tokenize(
    ...     "pick up the cup", state, actions)  # doctest: +SKIP
    >>> chunk = tokenizer.extract_actions(generated_ids, 10, 7)  # doctest: +SKIP
    """

    def __init__(self, model_path, fast_tokenizer, max_len=250, skip_tokens=128):
        self._sentencepiece = SentencePieceModel(model_path)
        if not isinstance(fast_tokenizer, FASTTokenizer):
            fast_tokenizer = FASTTokenizer.load(fast_tokenizer)
        if int(max_len) < 1:
            raise ValueError(f"'max_len' must be at least 1, got {max_len}.")
        if int(skip_tokens) < 0:
            raise ValueError(f"'skip_tokens' must be non-negative, got {skip_tokens}.")
        self.model_path = self._sentencepiece.path
        self.fast_tokenizer = fast_tokenizer
        self.max_len = int(max_len)
        self.skip_tokens = int(skip_tokens)
        self._check_action_range()

    @property
    def _processor(self):
        return self._sentencepiece.processor

    # === Files ===

    def save(self, directory):
        """Writes the SentencePiece model (`paligemma_tokenizer.model`) and the FAST tokenizer (`fast/`)."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._sentencepiece.save(directory / SENTENCEPIECE_FILE)
        self.fast_tokenizer.save(directory / FAST_DIRECTORY)
        return directory

    @classmethod
    def load(cls, directory, max_len=250, skip_tokens=128):
        """Reads a directory written by `save`; `max_len` and `skip_tokens` as in the constructor."""
        directory = pathlib.Path(directory)
        return cls(directory / SENTENCEPIECE_FILE, directory / FAST_DIRECTORY, max_len, skip_tokens)

    def _check_action_range(self):
        """The mapped action ids must stay inside the vocabulary, above the special ids."""
        vocabulary_size = self.vocabulary_size
        num_actions = self.fast_tokenizer.num_tokens
        lowest = vocabulary_size - 1 - self.skip_tokens - (num_actions - 1)
        specials = [
            i
            for i in (
                self._processor.pad_id(),
                self._processor.eos_id(),
                self._processor.bos_id(),
                self._processor.unk_id(),
            )
            if i >= 0
        ]
        floor = max(specials) + 1 if specials else 0
        if lowest < floor:
            raise ValueError(
                f"the FAST vocabulary ({num_actions} tokens) does not fit below the top "
                f"{self.skip_tokens} of the PaliGemma vocabulary ({vocabulary_size} tokens): "
                f"action ids vocabulary_size - 1 - skip_tokens - fast_id would reach {lowest}, "
                f"but must stay >= {floor} (above the special ids). Needs vocabulary_size >= "
                f"{floor + num_actions + self.skip_tokens}."
            )

    @property
    def vocabulary_size(self):
        """The size of the PaliGemma vocabulary (257152 for PaliGemma's own model)."""
        return self._processor.vocab_size()

    # === Action ids ===

    def fast_to_paligemma(self, fast_ids):
        """Maps FAST ids to PaliGemma ids: `vocabulary_size - 1 - skip_tokens - fast_id`."""
        return self.vocabulary_size - 1 - self.skip_tokens - np.asarray(fast_ids, dtype=np.int64)

    def paligemma_to_fast(self, paligemma_ids):
        """The inverse of `fast_to_paligemma` (the map is its own inverse)."""
        return self.fast_to_paligemma(paligemma_ids)

    # === Tokenize ===

    def prefix_ids(self, prompt, state):
        """BOS + `"Task: {prompt}, State: {bins};\\n"`, unpadded (a list of ids)."""
        if not isinstance(prompt, str):
            raise ValueError(f"'prompt' must be a str, got {type(prompt).__name__}.")
        state = np.asarray(state)
        if state.ndim != 1:
            raise ValueError(f"'state' must have shape (s,), got shape {state.shape}.")
        cleaned = prompt.lower().strip().replace("_", " ")
        bins = " ".join(str(int(b)) for b in discretize_state(state))
        return self._processor.encode(f"Task: {cleaned}, State: {bins};\n", add_bos=True)

    def postfix_ids(self, actions):
        """`"Action: "` + mapped FAST ids of the (H, D) chunk + `"|"` + EOS (a list of ids)."""
        action_ids = self.fast_to_paligemma(self.fast_tokenizer.encode(actions)).tolist()
        return (
            self._processor.encode(ACTION_PREFIX)
            + action_ids
            + self._processor.encode(ACTION_END, add_eos=True)
        )

    def tokenize(self, prompt, state, actions=None):
        """openpi's `FASTTokenizer.tokenize`.

        Args:
            prompt: the task instruction.
            state: the normalized (s,) state, expected in [-1, 1].
            actions: the normalized (H, D) action chunk for training, or None
                at inference (prefix only).

        Returns:
            `(tokens, token_mask, ar_mask, loss_mask)`, each of shape (L,):
            int32 ids, bool (True on real tokens), int32 (0 prefix, 1
            postfix), bool (True on the postfix).
        """
        prefix = self.prefix_ids(prompt, state)
        postfix = [] if actions is None else self.postfix_ids(actions)
        ids = prefix + postfix
        ar = [0] * len(prefix) + [1] * len(postfix)
        if len(ids) > self.max_len:
            logger.warning(
                "π0-FAST: the sequence has %d tokens, more than max_len %d: it is truncated. "
                "Consider a larger max_token_len if this happens often.",
                len(ids),
                self.max_len,
            )
            ids, ar = ids[: self.max_len], ar[: self.max_len]
        length = len(ids)
        tokens = np.zeros(self.max_len, np.int32)
        tokens[:length] = ids
        ar_mask = np.zeros(self.max_len, np.int32)
        ar_mask[:length] = ar
        token_mask = np.arange(self.max_len) < length
        return tokens, token_mask, ar_mask, ar_mask.astype(bool)

    # === Decode ===

    def extract_actions(self, generated_ids, horizon, dim, strict=False):
        """The (H, D) action chunk of a generated token sequence, as openpi.

        The ids are decoded to text; the text between `"Action: "` and `"|"`
        is stripped, re-encoded, mapped back to FAST ids and FAST-decoded.
        Without `"Action: "`, or when the FAST ids do not decode to (H, D),
        the result is zeros (the latter with a logged warning), or with
        `strict` a `FASTDecodeError` that says why.

        Args:
            generated_ids: the generated PaliGemma ids (1-D; padding 0 and EOS
                decode to nothing).
            horizon: H.
            dim: D.
            strict: raise instead of returning zeros.

        Returns:
            An (H, D) float32 array (normalized actions).

        Raises:
            FASTDecodeError: with `strict`, a sequence that holds no valid chunk.
        """
        ids = np.asarray(generated_ids).reshape(-1).astype(np.int64)
        outside = ids[(ids < 0) | (ids >= self.vocabulary_size)]
        if outside.size:
            raise ValueError(
                f"'generated_ids' holds ids outside the PaliGemma vocabulary [0, "
                f"{self.vocabulary_size}): {outside[:8].tolist()}; the model and the tokenizer "
                "must share one vocabulary."
            )
        text = self._processor.decode(ids.tolist())
        if ACTION_PREFIX not in text:
            if strict:
                raise FASTDecodeError(
                    f"the generated text has no {ACTION_PREFIX!r}: {_shorten(text)!r}."
                )
            return np.zeros((int(horizon), int(dim)), np.float32)
        action_text = text.split(ACTION_PREFIX)[1].split(ACTION_END)[0].strip()
        paligemma_ids = self._processor.encode(action_text)
        return self.fast_tokenizer.decode(
            self.paligemma_to_fast(paligemma_ids), horizon, dim, strict=strict
        )


def _shorten(text, limit=80):
    return text if len(text) <= limit else text[: limit - 3] + "..."
