"""The FAST action processor that `transformers.AutoProcessor` loads from a saved FAST directory.

openpi (and LeRobot) load FAST with
`AutoProcessor.from_pretrained(path, trust_remote_code=True)`: transformers
reads `auto_map["AutoProcessor"]` in `processor_config.json`, imports the
module it names from the directory and calls the class's `from_pretrained`.
`FASTTokenizer.save` copies this file into the directory and names it there,
so a directory written by keras_openpi loads in openpi as a FAST processor
that gives exactly the ids and chunks of `FASTTokenizer`.

The class has the interface of Physical Intelligence's released
`UniversalActionProcessor` that openpi calls: `processor(chunks)` for
(B, H, D) or (H, D) chunks gives B lists of ids, `processor.decode(ids_lists,
time_horizon=H, action_dim=D)` gives (B, H, D) chunks, and `bpe_tokenizer`,
`scale`, `min_token`, `time_horizon` and `action_dim` are attributes.

This file is self-contained (numpy, scipy, tokenizers; transformers when
present, for `bpe_tokenizer`): it runs in openpi's environment, where
keras_openpi is not installed. keras_openpi's `FASTTokenizer` uses its
functions, so both encode and decode with the same code.
"""

import json
import logging
import pathlib

import numpy as np
import scipy.fft
from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

PROCESSOR_CONFIG = "processor_config.json"
TOKENIZER_FILE = "tokenizer.json"
# transformers' ProcessorMixin may save the tokenizer files under the attribute's name.
TOKENIZER_SUBFOLDER = "bpe_tokenizer"
# Symbols are code points below the UTF-16 surrogates (which no UTF-8 string can hold).
MAX_SYMBOL = 0xD7FF
CONFIG_KEYS = ("scale", "vocab_size", "min_token", "time_horizon", "action_dim")


# === The FAST format, shared with keras_openpi's FASTTokenizer ===


def quantize(chunk, scale):
    """The rounded, scaled orthonormal DCT-II over time (H, D) int64 of an (H, D) chunk."""
    chunk = np.asarray(chunk, dtype=np.float64)
    return np.around(scipy.fft.dct(chunk, axis=0, norm="ortho") * scale).astype(np.int64)


def dequantize(coefficients, scale):
    """The (H, D) float64 chunk of quantized coefficients: inverse DCT of `coefficients / scale`."""
    coefficients = np.asarray(coefficients, dtype=np.float64) / scale
    return scipy.fft.idct(coefficients, axis=0, norm="ortho")


def to_text(coefficients, min_token, scale):
    """The BPE input: one character per coefficient, frequency-major, shifted by `-min_token`.

    Coefficients below `min_token` are clipped to it.

    Raises:
        ValueError: a coefficient is too large to be a character.
    """
    symbols = np.maximum(np.asarray(coefficients).reshape(-1) - min_token, 0)
    if symbols.size and symbols.max() > MAX_SYMBOL:
        raise ValueError(
            f"a quantized DCT coefficient ({int(symbols.max()) + min_token}) is too large "
            f"to encode: lower 'scale' (now {scale}) or normalize the actions."
        )
    return "".join(map(chr, symbols.tolist()))


def decode_text(decode, vocab_size, ids, horizon, dim, min_token, scale):
    """Decodes FAST ids into an (H, D) float64 chunk, or says why they hold none.

    Args:
        decode: the BPE's `decode(ids) -> str`.
        vocab_size: ids must lie in `[0, vocab_size)`.
        ids: a sequence of ints.
        horizon: H.
        dim: D.
        min_token: the shift.
        scale: the quantization scale.

    Returns:
        `(chunk, None)`, or `(None, reason)` for ids outside the vocabulary,
        byte tokens that do not form whole characters, or a count of
        coefficients other than H * D.
    """
    ids = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        return None, f"ids outside [0, {vocab_size}): {bad[:8]}"
    text = decode(ids)
    if "\ufffd" in text:
        return None, "the ids do not form valid characters (a split multi-byte symbol)"
    if len(text) != horizon * dim:
        return None, f"{len(text)} coefficients, expected {horizon} x {dim} = {horizon * dim}"
    symbols = np.fromiter(map(ord, text), dtype=np.int64, count=len(text))
    return dequantize((symbols + min_token).reshape(horizon, dim), scale), None


def find_tokenizer_file(directory):
    """`tokenizer.json` at the top of `directory` or under `bpe_tokenizer/`, or None."""
    directory = pathlib.Path(directory)
    candidates = (directory / TOKENIZER_FILE, directory / TOKENIZER_SUBFOLDER / TOKENIZER_FILE)
    return next((path for path in candidates if path.is_file()), None)


# === The processor ===


class _BPE:
    """What the processor uses of `transformers.PreTrainedTokenizerFast`, on `tokenizers` alone."""

    def __init__(self, tokenizer):
        self.backend_tokenizer = tokenizer

    def __call__(self, text):
        return {"input_ids": self.backend_tokenizer.encode(text).ids}

    def decode(self, ids):
        return self.backend_tokenizer.decode(list(ids))

    def __len__(self):
        return self.backend_tokenizer.get_vocab_size()


def load_bpe(tokenizer_file):
    """The BPE of `tokenizer_file`: a `PreTrainedTokenizerFast` where transformers is installed."""
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        return _BPE(Tokenizer.from_file(str(tokenizer_file)))
    return PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file), clean_up_tokenization_spaces=False
    )


class UniversalActionProcessor:
    """FAST: DCT over time, quantization, byte-level BPE (keras_openpi's `FASTTokenizer` format).

    Args:
        bpe_tokenizer: the BPE (`PreTrainedTokenizerFast`, or `load_bpe`'s).
        scale: the quantization scale of the DCT coefficients.
        vocab_size: the BPE vocabulary size it was trained with.
        min_token: the smallest quantized coefficient (the shift).
        action_dim: D for `decode`, or None.
        time_horizon: H for `decode`, or None.
    """

    attributes = ["bpe_tokenizer"]
    bpe_tokenizer_class = "AutoTokenizer"

    def __init__(
        self,
        bpe_tokenizer,
        scale=10,
        vocab_size=1024,
        min_token=0,
        *,
        action_dim=None,
        time_horizon=None,
    ):
        self.bpe_tokenizer = bpe_tokenizer
        self.scale = scale
        self.vocab_size = vocab_size
        self.min_token = min_token
        # decode's shape: its arguments, else these, else the last call's chunk shape.
        self.time_horizon = time_horizon
        self.action_dim = action_dim
        self.called_time_horizon = time_horizon
        self.called_action_dim = action_dim

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoProcessor"):
        """Called by `AutoProcessor` before `from_pretrained`; nothing to register."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Reads a local FAST directory (`processor_config.json` and `tokenizer.json`).

        Keyword arguments that `AutoProcessor` passes (`trust_remote_code`, ...) are ignored.

        Raises:
            FileNotFoundError: the directory lacks one of the files.
        """
        directory = pathlib.Path(pretrained_model_name_or_path)
        config_path = directory / PROCESSOR_CONFIG
        if not config_path.is_file():
            raise FileNotFoundError(f"no {PROCESSOR_CONFIG} in {directory} (a local directory).")
        config = json.loads(config_path.read_text())
        tokenizer_file = find_tokenizer_file(directory)
        if tokenizer_file is None:
            raise FileNotFoundError(
                f"no {TOKENIZER_FILE} in {directory} (nor in {TOKENIZER_SUBFOLDER}/)."
            )
        settings = {key: config[key] for key in CONFIG_KEYS if config.get(key) is not None}
        return cls(load_bpe(tokenizer_file), **settings)

    def __call__(self, action_chunk):
        """The FAST ids of (B, H, D) or (H, D) action chunks: a list of B lists of ints."""
        chunks = np.asarray(action_chunk)
        if chunks.ndim not in (2, 3):
            raise ValueError(
                f"FAST encodes action chunks (B, H, D) or (H, D), got shape {chunks.shape}."
            )
        if chunks.ndim == 2:
            chunks = chunks[None]
        if not np.all(np.isfinite(chunks)):
            raise ValueError("FAST: the action chunks hold NaN or infinite values.")
        self.called_time_horizon, self.called_action_dim = chunks.shape[1:]
        texts = [to_text(quantize(c, self.scale), self.min_token, self.scale) for c in chunks]
        return [list(self.bpe_tokenizer(text)["input_ids"]) for text in texts]

    def decode(self, tokens, *, time_horizon=None, action_dim=None):
        """The (B, H, D) float64 chunks of B id lists.

        An id list that holds no valid (H, D) chunk decodes to zeros, with a
        logged warning.
        """
        self.time_horizon = time_horizon or self.time_horizon or self.called_time_horizon
        self.action_dim = action_dim or self.action_dim or self.called_action_dim
        self.called_time_horizon, self.called_action_dim = self.time_horizon, self.action_dim
        if self.time_horizon is None or self.action_dim is None:
            raise ValueError(
                "FAST decode needs the chunk shape: pass time_horizon and action_dim, or "
                "encode a chunk first."
            )
        shape = (int(self.time_horizon), int(self.action_dim))
        chunks = []
        for ids in tokens:
            vocab_size = len(self.bpe_tokenizer)
            chunk, problem = decode_text(
                self.bpe_tokenizer.decode, vocab_size, ids, *shape, self.min_token, self.scale
            )
            if problem is not None:
                logger.warning(
                    "FAST: cannot decode %d tokens (%s); returning zeros.", len(ids), problem
                )
                chunk = np.zeros(shape)
            chunks.append(chunk)
        return np.stack(chunks) if chunks else np.zeros((0, *shape))
