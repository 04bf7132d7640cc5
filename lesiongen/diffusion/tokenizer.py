"""The real 49,408-token CLIP tokenizer, derived offline from the BPE file that open_clip ships.

SD 1.x uses OpenAI's CLIP BPE: 256 byte symbols, the same 256 with `</w>`, the first 48,894 merges of
`bpe_simple_vocab_16e6.txt.gz` (each joined into one token), then `<|startoftext|>` and
`<|endoftext|>`. Writing that out as `vocab.json` + `merges.txt` gives the same files
`openai/clip-vit-large-patch14` has on the hub, so no download is needed.
"""

from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from pathlib import Path

from lesiongen.utils.atomic import write_text
from lesiongen.utils.cache import cache_root
from lesiongen.utils.hashing import sha256_file

CLIP_VOCAB_SIZE = 49_408
CLIP_NUM_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2  # 48,894
CLIP_MAX_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def open_clip_bpe_path() -> Path:
    # Imported lazily: open_clip pulls in torch and timm.
    from open_clip.tokenizer import default_bpe

    return Path(default_bpe())


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable unicode map (the 256 base symbols, in vocab order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def derive_vocab_and_merges(bpe_path: str | os.PathLike) -> tuple[dict[str, int], list[str]]:
    """Token -> id map and merge lines exactly as OpenAI CLIP builds them from the BPE file."""
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : CLIP_NUM_MERGES + 1]  # line 0 is the '#version' header
    if len(merges) != CLIP_NUM_MERGES or any(len(m.split()) != 2 for m in merges):
        raise ValueError(f"{bpe_path}: expected {CLIP_NUM_MERGES} merge lines of two symbols")
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ValueError(f"{bpe_path}: derived {len(vocab)} distinct tokens, expected {CLIP_VOCAB_SIZE}")
    return vocab, merges


def write_tokenizer_files(out_dir: str | os.PathLike, bpe_path: str | os.PathLike | None = None) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json (SD 1.5's settings) into `out_dir`."""
    out_dir = Path(out_dir)
    vocab, merges = derive_vocab_and_merges(bpe_path or open_clip_bpe_path())
    write_text(out_dir / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    write_text(out_dir / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": CLIP_MAX_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,  # SD 1.5 pads with <|endoftext|>
        "do_lower_case": True,
    }
    # Written last: its presence marks a complete cache entry.
    write_text(out_dir / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    return out_dir


def build_clip_tokenizer(cache_dir: str | os.PathLike | None = None):
    """The SD 1.x CLIP tokenizer (`transformers.CLIPTokenizer`), built from cached derived files.

    The cache folder is keyed by the BPE file's hash, so a different open_clip release never reuses
    files derived from another one.
    """
    from transformers import CLIPTokenizer

    bpe_path = open_clip_bpe_path()
    if cache_dir is None:
        cache_dir = cache_root() / f"clip-tokenizer-{sha256_file(bpe_path)[:12]}"
    cache_dir = Path(cache_dir)
    if not (cache_dir / "tokenizer_config.json").is_file():
        write_tokenizer_files(cache_dir, bpe_path)
    return CLIPTokenizer.from_pretrained(str(cache_dir), local_files_only=True)
