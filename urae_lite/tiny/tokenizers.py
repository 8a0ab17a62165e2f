"""CLIP and T5 tokenizers built offline, with real whole-word tokens for common prompt words.

The tiny model needs tokenizers that load through transformers' own classes (``CLIPTokenizer``, ``T5TokenizerFast``)
and tokenize any prompt, without downloading the real vocabularies.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from .configs import CLIP_MAX_POSITIONS, T5_EXTRA_IDS, T5_MAX_LENGTH
from .folders import write_json

# Words given whole-word tokens in both tokenizers, so prompts do not all fall apart into single characters.
_COMMON_WORDS = """
a an the of and or in on at to with by for from as is are was be this that it its into over under
photo photograph picture image painting drawing illustration render portrait landscape close up view
high resolution detailed sharp realistic cinematic lighting light dark bright sun sunset sunrise night
sky cloud clouds mountain mountains river lake sea ocean beach forest tree trees flower flowers garden
city street building house room window door road bridge snow rain water fire stone wood glass metal
cat dog bird horse fish person man woman child people face eyes hair hand hands smile
red orange yellow green blue purple pink black white gray brown gold silver colorful
big small large tiny old young new beautiful quiet calm soft warm cold golden hour style art
""".split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (the byte-level BPE alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace each left-to-right occurrence of ``pair`` in ``symbols`` by its concatenation."""
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


def _train_bpe_merges(words: list[list[str]]) -> list[tuple[str, str]]:
    """Plain BPE training on a tiny word list: repeatedly merge the most frequent adjacent pair.

    Hand-chained merges interfere (``t o</w>`` from "to" would split "photo"); trained merges replay exactly,
    so every listed word becomes one token. Ties break on the pair itself, keeping the result deterministic.
    """
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for symbols in words:
            for pair in zip(symbols, symbols[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        words = [_merge_pair(symbols, best) for symbols in words]


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary layout: 256 byte symbols, the same with ``</w>``, merge results, then specials.

    Every byte is in the base alphabet, so any UTF-8 prompt tokenizes without unknowns; merges trained on
    the common words give real whole-word tokens.
    """
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [f"{symbol}</w>" for symbol in alphabet]
    merges = _train_bpe_merges([[*word[:-1], f"{word[-1]}</w>"] for word in _COMMON_WORDS])
    tokens += dict.fromkeys(left + right for left, right in merges)  # two merges may spell the same token
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def write_clip_tokenizer(folder: Path) -> int:
    """Write CLIP tokenizer files (vocab.json, merges.txt and tokenizer.json); return the vocab size.

    vocab.json + merges.txt serve the slow/legacy loaders, tokenizer.json the fast one; both come from
    the same vocabulary, with CLIP's normaliser, pre-tokeniser and ``<|startoftext|> ... <|endoftext|>`` framing.
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab, merges = _clip_vocab_and_merges()
    folder.mkdir(parents=True, exist_ok=True)
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=eos,
        )
    )
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    split = Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(split, behavior="removed", invert=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.RobertaProcessing(
        (eos, vocab[eos]), (bos, vocab[bos]), trim_offsets=False, add_prefix_space=False
    )
    tokenizer.add_special_tokens([bos, eos])
    tokenizer.save(str(folder / "tokenizer.json"))

    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges)
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": CLIP_MAX_POSITIONS,
            "bos_token": bos,
            "eos_token": eos,
            "unk_token": eos,
            "pad_token": eos,
            "do_lower_case": True,
            "errors": "replace",
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": True,
        },
    )
    specials = {"bos_token": bos, "eos_token": eos, "unk_token": eos, "pad_token": eos}
    write_json(folder / "special_tokens_map.json", specials)
    return len(vocab)


def _t5_vocab() -> list[tuple[str, float]]:
    """A SentencePiece-style Unigram vocabulary laid out like T5's: <pad>, </s>, <unk>, pieces, sentinels.

    Pieces are printable ASCII and common accented letters (alone and word-initial) plus the common words
    (word-initial and inside a word, e.g. after a quote), scored so whole words win. Anything else, such as
    emoji, maps to <unk>, as with T5's own vocabulary.
    """
    chars = [c for c in string.printable if not c.isspace()] + list("àáâäçèéêëìíîïñòóôöùúûüßÀÉÖÜ")
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [(f"▁{c}", -7.0) for c in chars] + [(c, -8.0) for c in chars]
    pieces += [(f"▁{word}", -4.0) for word in _COMMON_WORDS if len(word) > 1]
    pieces += [(word, -5.0) for word in _COMMON_WORDS if len(word) > 1]
    pieces += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(T5_EXTRA_IDS))]
    return pieces


def write_t5_tokenizer(folder: Path) -> int:
    """Write a T5 tokenizer (tokenizer.json, no sentencepiece model needed); return the vocab size.

    Uses T5's Metaspace pre-tokenisation and ``... </s>`` framing so ``T5TokenizerFast`` loads it directly.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram

    vocab = _t5_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    extra_ids = [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)]
    tokenizer.add_special_tokens(["<pad>", "</s>", "<unk>", *extra_ids])
    tokenizer.save(str(folder / "tokenizer.json"))

    specials = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "T5Tokenizer",
            "model_max_length": T5_MAX_LENGTH,
            "extra_ids": T5_EXTRA_IDS,
            "additional_special_tokens": extra_ids,
            "legacy": True,
            "clean_up_tokenization_spaces": True,
            **specials,
        },
    )
    write_json(folder / "special_tokens_map.json", {**specials, "additional_special_tokens": extra_ids})
    return len(vocab)
