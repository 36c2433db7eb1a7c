"""A word-level tokenizer over the scene grammar's vocabulary, as a ``PreTrainedTokenizerFast``."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from aiflow_stream.scenes import vocabulary

PAD, BOS, EOS, UNK = "[PAD]", "[BOS]", "[EOS]", "[UNK]"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build the default family's tokenizer: ids 0-3 are PAD, BOS, EOS, UNK, then the words."""
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK, *vocabulary()])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=64,
    )
