"""Prompts at serving time: choosing a tokenizer, and prompts or ready token ids."""

import dataclasses
import os

import numpy as np

from keras_openpi.tokenizers import ByteTokenizer
from keras_openpi.tokenizers import FASTPromptTokenizer
from keras_openpi.tokenizers import PaliGemmaTokenizer


def resolve_tokenizer(spec, model):
    """The prompt tokenizer for `model` from a CLI-style spec.

    Args:
        spec: π0 / π0.5: None (the byte tokenizer when `model.vocabulary_size`
            is the byte tokenizer's 259, as for `keras-openpi demo` models;
            otherwise no tokenizer), `"byte"`, a path to a SentencePiece
            `.model` file (PaliGemma's tokenizer), or a tokenizer object with
            `tokenize`. π0-FAST: None (the tokenizer the model carries) or,
            for a model that carries none, a directory written by
            `FASTPromptTokenizer.save` (`paligemma_tokenizer.model` and
            `fast/`), which the model then carries.
        model: the policy model (its `max_token_len` is the token length).

    Returns:
        an object with `tokenize(prompt, state=None) -> (ids, mask)` (π0-FAST:
        the `FASTPromptTokenizer`), or None.

    Raises:
        ValueError: a spec that cannot tokenize for this model.
    """
    if model.model_type == "pi0_fast":
        return _fast_tokenizer(spec, model)
    max_len = model.max_token_len
    if spec is None:
        if model.vocabulary_size != ByteTokenizer.vocabulary_size:
            return None
        spec = "byte"
    if spec == "byte":
        if model.vocabulary_size < ByteTokenizer.vocabulary_size:
            raise ValueError(
                f"the byte tokenizer needs a vocabulary of {ByteTokenizer.vocabulary_size} ids; "
                f"the model has {model.vocabulary_size}."
            )
        return ByteTokenizer(max_len)
    if isinstance(spec, (str, os.PathLike)):
        try:
            tokenizer = PaliGemmaTokenizer(spec, max_len=max_len)
        except RuntimeError:  # SentencePiece's own parse error
            raise ValueError(
                f"the tokenizer {os.fspath(spec)} is not a SentencePiece .model file "
                "(SentencePiece cannot parse it); pass PaliGemma's tokenizer file."
            ) from None
        if tokenizer.vocabulary_size > model.vocabulary_size:
            raise ValueError(
                f"the tokenizer {os.fspath(spec)} has {tokenizer.vocabulary_size:,} ids but the "
                f"model's vocabulary has {model.vocabulary_size:,}; pass the tokenizer the model "
                "was trained with."
            )
        return tokenizer
    if hasattr(spec, "tokenize"):
        return spec
    raise ValueError(
        f"'tokenizer' must be None, 'byte', a SentencePiece .model path or an object with "
        f"tokenize, got {type(spec).__name__}."
    )


def _fast_tokenizer(spec, model):
    """π0-FAST's `FASTPromptTokenizer`: the one the model carries, or the directory `spec`."""
    carried = model.tokenizer.tokenizer
    if spec is None:
        if carried is None:
            raise ValueError(
                "this π0-FAST model carries no tokenizer: give one with --tokenizer DIR (a "
                "directory with paligemma_tokenizer.model and fast/, as FASTPromptTokenizer.save "
                "writes), or convert the model with --paligemma-tokenizer and --fast-tokenizer."
            )
        return carried
    if carried is not None:
        raise ValueError(
            "this π0-FAST model carries its own tokenizer (saved with it), which decodes its "
            "actions; drop --tokenizer."
        )
    if isinstance(spec, FASTPromptTokenizer):
        tokenizer = spec
    elif isinstance(spec, (str, os.PathLike)) and os.path.isdir(spec):
        tokenizer = FASTPromptTokenizer.load(
            spec, max_len=model.max_token_len, skip_tokens=model.tokenizer.skip_tokens
        )
    else:
        raise ValueError(
            f"a π0-FAST model's --tokenizer must be a directory with paligemma_tokenizer.model "
            f"and fast/ (FASTPromptTokenizer.save), got {spec!r}."
        )
    if tokenizer.vocabulary_size > model.vocabulary_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocabulary_size:,} ids but the model's vocabulary has "
            f"{model.vocabulary_size:,}; pass the tokenizer the model was trained with."
        )
    model.set_tokenizer(tokenizer)
    return tokenizer


@dataclasses.dataclass(frozen=True)
class PromptOrTokens:
    """Tokenizes `prompt`, or passes through the `tokenized_prompt` the client sent.

    A request may carry ready ids (`tokenized_prompt`, optional
    `tokenized_prompt_mask`, in the model's vocabulary): they are used as sent
    and any `prompt` is dropped (for π0-FAST the ids must then hold the
    state too). Otherwise `prompt` is tokenized by `tokenize` (openpi's
    `TokenizePrompt`, or π0-FAST's `TokenizeFASTInputs`), which needs a tokenizer.

    Args:
        tokenize: the `TokenizePrompt` or `TokenizeFASTInputs` transform to apply to prompts.
    """

    tokenize: object

    def __call__(self, data):
        if "tokenized_prompt" in data:
            return {k: v for k, v in data.items() if k != "prompt"}
        if data.get("prompt") is None:
            raise ValueError(
                f"the observation has no 'prompt' (a str) or 'tokenized_prompt' and the server "
                f"has no default prompt (--default-prompt); it has {sorted(data)}."
            )
        prompt = data["prompt"]
        is_text_array = isinstance(prompt, np.ndarray) and prompt.dtype.kind in "US"
        if not (isinstance(prompt, (str, bytes)) or (is_text_array and prompt.ndim == 0)):
            raise ValueError(f"'prompt' must be a str, got {type(prompt).__name__}.")
        if self.tokenize.tokenizer is None:
            raise ValueError(
                "the observation has a 'prompt' but the server has no tokenizer: start it with "
                "--tokenizer (a SentencePiece .model, or 'byte'), or send 'tokenized_prompt'."
            )
        return self.tokenize(data)
