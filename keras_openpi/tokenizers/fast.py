"""FAST: the DCT + BPE action tokenizer of π0-FAST (Pertsch et al., 2025)."""

import json
import logging
import pathlib
import shutil

import numpy as np
from tokenizers import Tokenizer
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import processors
from tokenizers import trainers

from keras_openpi.tokenizers import fast_processor
from keras_openpi.tokenizers.fast_processor import PROCESSOR_CONFIG
from keras_openpi.tokenizers.fast_processor import TOKENIZER_FILE
from keras_openpi.tokenizers.fast_processor import TOKENIZER_SUBFOLDER

logger = logging.getLogger(__name__)

NUM_BYTES = 256
# The processor module's file name in a saved directory, and the class `AutoProcessor` loads.
PROCESSOR_MODULE = "fast_processor.py"
AUTO_MAP = {"AutoProcessor": "fast_processor.UniversalActionProcessor"}


class FASTDecodeError(ValueError):
    """Generated tokens that hold no valid action chunk (raised by strict decoding)."""


def _bpe_tokenizer():
    """An empty byte-level BPE, laid out like the released FAST tokenizer's `tokenizer.json`."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    return bpe


def _check_chunk(chunk, name="chunk"):
    chunk = np.asarray(chunk, dtype=np.float64)
    if chunk.ndim != 2:
        raise ValueError(
            f"'{name}' must be an action chunk of shape (H, D), got shape {chunk.shape}."
        )
    if not np.all(np.isfinite(chunk)):
        raise ValueError(f"'{name}' holds NaN or infinite values.")
    return chunk


class FASTTokenizer:
    """The FAST action tokenizer: DCT over time, quantization, then BPE.

    Encoding an (H, D) action chunk: the orthonormal DCT-II of each action
    dimension over the H time steps, the coefficients multiplied by `scale`
    and rounded, shifted by `-min_token` (the smallest rounded coefficient
    seen by `fit`; smaller ones are clipped to it), flattened frequency-major
    (the D coefficients of frequency 0, then those of frequency 1, ...), each
    integer written as the unicode character of that code point, and the
    string compressed with a byte-level BPE. Decoding inverts every step;
    rounding is the only loss: each coefficient is off by at most
    `0.5 / scale`.

    This is the algorithm and the on-disk format of Physical Intelligence's
    released processor (`physical-intelligence/fast`, `UniversalActionProcessor`):
    `load` reads such a directory (`processor_config.json` and
    `tokenizer.json`, as `save_pretrained` writes them) from a local path and
    gives the same ids; nothing is downloaded. `save` writes the same files.
    One difference in training: `fit` seeds the BPE with the 256 byte
    symbols (the released `fit` seeds it with the characters `0..max -
    min_token`), so every byte has a token and a coefficient outside the
    training range is still encoded rather than silently dropped.

    Args:
        scale: the quantization scale applied to the DCT coefficients.
        vocab_size: the BPE vocabulary size `fit` trains.
        min_token: the shift (the smallest quantized coefficient); set by `fit`.
        time_horizon: the chunk length H that `decode` uses when none is given.
        action_dim: the action width D that `decode` uses when none is given.

    Example:
    >>> rng = np.random.default_rng(0)
    >>> chunks = np.cumsum(rng.normal(0, 0.1, (200, 10, 2)), axis=1)
    >>> tokenizer = FASTTokenizer(scale=10, vocab_size=256).fit(chunks)
    >>> ids = tokenizer.encode(chunks[0])
    >>> restored = tokenizer.decode(ids, 10, 2)
    >>> bool(np.abs(restored - chunks[0]).max() < 0.1)
    True
    """

    def __init__(
        self, scale=10.0, vocab_size=1024, min_token=0, time_horizon=None, action_dim=None
    ):
        if not float(scale) > 0:
            raise ValueError(f"'scale' must be positive, got {scale}.")
        if int(vocab_size) < 1:
            raise ValueError(f"'vocab_size' must be positive, got {vocab_size}.")
        self.scale = float(scale)
        self.vocab_size = int(vocab_size)
        self.min_token = int(min_token)
        self.time_horizon = None if time_horizon is None else int(time_horizon)
        self.action_dim = None if action_dim is None else int(action_dim)
        self._bpe = None

    # === Quantization ===

    def quantize(self, chunk):
        """The rounded, scaled DCT coefficients (H, D) int64 of an (H, D) chunk (unshifted)."""
        return fast_processor.quantize(_check_chunk(chunk), self.scale)

    def dequantize(self, coefficients):
        """The (H, D) chunk of quantized coefficients: inverse DCT of `coefficients / scale`."""
        return fast_processor.dequantize(coefficients, self.scale)

    def _to_text(self, coefficients):
        return fast_processor.to_text(coefficients, self.min_token, self.scale)

    # === Training ===

    def fit(self, action_chunks):
        """Sets `min_token` and trains the BPE vocabulary on action chunks.

        Args:
            action_chunks: an iterable of (H, D) arrays (an (N, H, D) array
                works); chunk shapes may differ. When they all share one
                shape it becomes the default `time_horizon`/`action_dim`.

        Returns:
            `self`, fitted.
        """
        if self.vocab_size < NUM_BYTES:
            raise ValueError(
                f"'vocab_size' must be at least {NUM_BYTES} (the byte-level base symbols), got "
                f"{self.vocab_size}."
            )
        coefficients = [
            self.quantize(_check_chunk(chunk, f"action_chunks[{i}]"))
            for i, chunk in enumerate(action_chunks)
        ]
        if not coefficients:
            raise ValueError("'action_chunks' is empty: fit needs at least one (H, D) chunk.")
        flat = np.concatenate([c.reshape(-1) for c in coefficients])
        self.min_token = int(flat.min())
        num_symbols = int(flat.max()) - self.min_token + 1
        if num_symbols + 100 > self.vocab_size:
            logger.warning(
                "FAST: %d quantized values nearly fill the vocabulary of %d: BPE has little "
                "room to merge; consider a larger vocab_size or a smaller scale.",
                num_symbols,
                self.vocab_size,
            )
        shapes = {c.shape for c in coefficients}
        if len(shapes) == 1:
            self.time_horizon, self.action_dim = shapes.pop()

        bpe = _bpe_tokenizer()
        trainer = trainers.BpeTrainer(
            vocab_size=self.vocab_size,
            min_frequency=2,
            show_progress=False,
            special_tokens=[],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            max_token_length=10000,
        )
        bpe.train_from_iterator((self._to_text(c) for c in coefficients), trainer=trainer)
        self._bpe = bpe
        return self

    def _fitted_bpe(self):
        if self._bpe is None:
            raise ValueError(
                "this FASTTokenizer has no BPE vocabulary: call fit(action_chunks) or "
                "FASTTokenizer.load(directory) first."
            )
        return self._bpe

    @property
    def num_tokens(self):
        """The size of the trained vocabulary: ids lie in `[0, num_tokens)`."""
        return self._fitted_bpe().get_vocab_size()

    # === Encoding ===

    def encode(self, chunk):
        """Tokenizes one action chunk.

        Args:
            chunk: an (H, D) array of (normalized) actions.

        Returns:
            A list of FAST token ids.
        """
        bpe = self._fitted_bpe()
        return bpe.encode(self._to_text(self.quantize(chunk))).ids

    def decode(self, ids, horizon=None, dim=None, strict=False):
        """The (H, D) action chunk of FAST ids.

        Ids that do not decode to exactly H * D coefficients (e.g. a truncated
        or malformed generation) give zeros and a logged warning, as openpi.
        So do ids outside the vocabulary and byte tokens that do not form
        whole characters (openpi would decode U+FFFD as a huge coefficient).

        Args:
            ids: a sequence of FAST ids.
            horizon: H; defaults to `time_horizon`.
            dim: D; defaults to `action_dim`.
            strict: raise a `FASTDecodeError` naming the problem instead of
                returning zeros.

        Returns:
            An (H, D) float32 array.

        Raises:
            FASTDecodeError: with `strict`, ids that hold no (H, D) chunk.
        """
        bpe = self._fitted_bpe()
        horizon = self.time_horizon if horizon is None else int(horizon)
        dim = self.action_dim if dim is None else int(dim)
        if horizon is None or dim is None:
            raise ValueError(
                "decode needs the chunk shape: pass 'horizon' and 'dim' (or set time_horizon "
                "and action_dim on the tokenizer)."
            )
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        chunk, problem = fast_processor.decode_text(
            bpe.decode, bpe.get_vocab_size(), ids, horizon, dim, self.min_token, self.scale
        )
        if problem is not None:
            if strict:
                raise FASTDecodeError(f"FAST: cannot decode {len(ids)} tokens ({problem}).")
            logger.warning(
                "FAST: cannot decode %d tokens (%s); returning zeros.", len(ids), problem
            )
            return np.zeros((horizon, dim), np.float32)
        return chunk.astype(np.float32)

    # === Files ===

    def get_config(self):
        """The processor settings (the keys of the released `processor_config.json`)."""
        return {
            "scale": self.scale,
            "vocab_size": self.vocab_size,
            "min_token": self.min_token,
            "time_horizon": self.time_horizon,
            "action_dim": self.action_dim,
        }

    def save(self, directory):
        """Writes the tokenizer in the released processor's format, loadable by openpi.

        Files: `processor_config.json` (scale, vocab_size, min_token,
        time_horizon, action_dim, processor_class and the `auto_map` that
        `transformers.AutoProcessor` follows), `fast_processor.py` (the
        processor class it names: `keras_openpi.tokenizers.fast_processor`),
        `tokenizer.json` (the BPE), and `tokenizer_config.json` /
        `special_tokens_map.json` so that
        `transformers.PreTrainedTokenizerFast.from_pretrained` reads it too.
        openpi's `AutoProcessor.from_pretrained(directory, trust_remote_code=True)`
        then gives a processor with this tokenizer's ids and chunks.
        """
        bpe = self._fitted_bpe()
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            **self.get_config(),
            "auto_map": AUTO_MAP,
            "processor_class": "UniversalActionProcessor",
        }
        shutil.copyfile(fast_processor.__file__, directory / PROCESSOR_MODULE)
        config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        (directory / PROCESSOR_CONFIG).write_text(config_text)
        bpe.save(str(directory / TOKENIZER_FILE))
        tokenizer_config = {
            "added_tokens_decoder": {},
            "clean_up_tokenization_spaces": False,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
        tokenizer_config_text = json.dumps(tokenizer_config, indent=2) + "\n"
        (directory / "tokenizer_config.json").write_text(tokenizer_config_text)
        (directory / "special_tokens_map.json").write_text("{}\n")
        return directory

    @classmethod
    def load(cls, directory):
        """Reads a tokenizer directory written by `save` or by the released processor.

        Args:
            directory: a local directory holding `processor_config.json` and
                `tokenizer.json` (at the top or under `bpe_tokenizer/`), e.g.
                a download of `physical-intelligence/fast`.
        """
        directory = pathlib.Path(directory)
        config_path = directory / PROCESSOR_CONFIG
        if not config_path.is_file():
            raise FileNotFoundError(
                f"no {PROCESSOR_CONFIG} in {directory}: pass a FAST tokenizer directory "
                "(FASTTokenizer.save, or the files of physical-intelligence/fast)."
            )
        config = json.loads(config_path.read_text())
        for key in ("scale", "min_token"):
            if config.get(key) is None:
                raise ValueError(f"{config_path} has no '{key}': got keys {sorted(config)}.")
        tokenizer_path = fast_processor.find_tokenizer_file(directory)
        if tokenizer_path is None:
            raise FileNotFoundError(
                f"no {TOKENIZER_FILE} in {directory} (nor in {TOKENIZER_SUBFOLDER}/): the FAST "
                "directory must hold its BPE tokenizer."
            )
        tokenizer = cls(
            scale=config["scale"],
            vocab_size=config.get("vocab_size", 1024),
            min_token=config["min_token"],
            time_horizon=config.get("time_horizon"),
            action_dim=config.get("action_dim"),
        )
        tokenizer._bpe = Tokenizer.from_file(str(tokenizer_path))
        return tokenizer
