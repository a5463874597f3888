"""π0-FAST's tokenizer files for the tests: a tiny PaliGemma-like SentencePiece model and a FAST tokenizer.

Nothing is downloaded: the SentencePiece model (768 ids, `<loc>` and `<seg>`
pieces at the top, as PaliGemma's) is trained here, and the FAST tokenizer is
fitted on smooth random action chunks.
"""

import numpy as np
from test_fast_prompt import NUM_LOC
from test_fast_prompt import train_sentencepiece

from keras_openpi.tokenizers import FASTPromptTokenizer
from keras_openpi.tokenizers import FASTTokenizer

VOCABULARY_SIZE = 768  # the tiny SentencePiece model's


def fit_fast(horizon, dim, seed=1, count=300):
    """A FAST tokenizer fitted on `count` smooth (horizon, dim) random walks in about [-1, 1]."""
    rng = np.random.default_rng(seed)
    chunks = rng.uniform(-0.6, 0.6, (count, 1, dim)) + np.cumsum(
        rng.normal(0.0, 0.05, (count, horizon, dim)), axis=1
    )
    return FASTTokenizer(vocab_size=NUM_LOC).fit(chunks)


def write_tokenizer_files(directory, horizon, dim):
    """Writes `paligemma_tokenizer.model` and `fast/` into `directory`; returns both paths."""
    directory.mkdir(parents=True, exist_ok=True)
    model_path = directory / "paligemma_tokenizer.model"
    model_path.write_bytes(train_sentencepiece(with_locations=True))
    fast_dir = directory / "fast"
    fit_fast(horizon, dim).save(fast_dir)
    return model_path, fast_dir


def prompt_tokenizer(directory, horizon, dim, max_len):
    """A `FASTPromptTokenizer` over the files `write_tokenizer_files` writes to `directory`."""
    model_path, fast_dir = write_tokenizer_files(directory, horizon, dim)
    return FASTPromptTokenizer(model_path, fast_dir, max_len=max_len)
