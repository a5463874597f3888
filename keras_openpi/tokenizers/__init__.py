from keras_openpi.tokenizers.byte_tokenizer import ByteTokenizer
from keras_openpi.tokenizers.fast import FASTTokenizer
from keras_openpi.tokenizers.fast_prompt import FASTPromptTokenizer
from keras_openpi.tokenizers.paligemma import PaliGemmaTokenizer

__all__ = ["ByteTokenizer", "FASTPromptTokenizer", "FASTTokenizer", "PaliGemmaTokenizer"]
