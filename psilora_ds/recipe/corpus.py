"""The offline default's data: a corpus generated here (no download) and a tokenizer trained on it.

The corpus is synthetic English-like text written by :func:`generate_corpus` from a fixed seed:
templated sentences about people, objects and places, plus small sums written out in words and
digits. It is produced by this repository's code, so it carries the project's licence (Apache-2.0);
4000 lines are 228 KB. Its regularities (agreement, arithmetic) give a loss that falls fast.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable

SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the robot", "a teacher", "the children", "our neighbour",
            "the pilot", "a farmer", "the painter", "my friend"]
VERBS = ["sees", "likes", "builds", "paints", "carries", "finds", "opens", "cleans", "follows", "draws"]
OBJECTS = ["a red box", "the blue door", "an old map", "the small boat", "a wooden chair", "the green lamp",
           "a long letter", "the heavy stone", "a bright kite", "the silver key"]
PLACES = ["in the garden", "at the station", "near the river", "on the hill", "in the kitchen", "at school",
          "by the sea", "under the bridge"]
TIMES = ["every morning", "on sunday", "at night", "after lunch", "in the winter", "before dinner"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
           "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]


def corpus_line(rng: random.Random) -> str:
    """One line of the offline corpus: a sentence (60%), a sum in words and digits (25%), or a
    two-clause sentence (15%)."""
    kind = rng.random()
    if kind < 0.6:
        return (f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} "
                f"{rng.choice(PLACES)} {rng.choice(TIMES)}.")
    if kind < 0.85:
        a, b = rng.randrange(10), rng.randrange(9)
        return f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]}, so {a} + {b} = {a + b}."
    s = rng.choice(SUBJECTS)
    return (f"{s} {rng.choice(VERBS)} {rng.choice(OBJECTS)}, and then {s} {rng.choice(VERBS)} "
            f"{rng.choice(OBJECTS)} {rng.choice(PLACES)}.")


def generate_corpus(path: str, lines: int, seed: int = 0,
                    line: Callable[[random.Random], str] = corpus_line) -> str:
    """Write ``lines`` lines made by ``line`` from a ``seed``-ed generator to ``path`` (once; the
    content depends only on ``lines``, ``seed`` and ``line``) and return the path."""
    if os.path.exists(path):
        return path
    rng = random.Random(seed)
    out = [line(rng) for _ in range(lines)]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write("\n".join(out) + "\n")
    os.replace(tmp, path)  # atomic: concurrent ranks never read a half-written file
    return path


def train_tokenizer(corpus_path: str, out_dir: str, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on the lines of a corpus file (:func:`bpe_tokenizer`)."""
    def lines():
        with open(corpus_path) as f:
            yield from f

    return bpe_tokenizer(lines, out_dir, vocab_size)


def bpe_tokenizer(texts: Callable[[], Iterable[str]], out_dir: str, vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts()`` (called only when ``out_dir`` holds none yet), saved
    there and reloaded as a transformers ``PreTrainedTokenizerFast`` (with bos/eos/pad tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if not os.path.exists(os.path.join(out_dir, "tokenizer.json")):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts(), trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
        tmp = f"{out_dir}.tmp{os.getpid()}"
        fast.save_pretrained(tmp)
        os.makedirs(os.path.dirname(out_dir) or ".", exist_ok=True)
        try:
            os.replace(tmp, out_dir)
        except OSError:  # another rank got there first
            pass
    return AutoTokenizer.from_pretrained(out_dir)
