"""Regenerate the bundled corpus and tokenizer (deterministic; no downloads).

    python -m shardtrain.runtime.assets.make_assets

corpus.txt: ~200 KB of generated English-like text (templated stories, facts, arithmetic and
counting), documents separated by blank lines. It has enough structure that a tiny Llama's loss
falls clearly within ~100 steps. tokenizer.json: byte-level BPE (vocab 512) trained on it with the
`tokenizers` library; specials <unk>=0, <s>=1, </s>=2, <pad>=3 (the ids tiny-llama.json uses).
"""
from __future__ import annotations

import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20240501
TARGET_BYTES = 200_000
VOCAB_SIZE = 512
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]

NAMES = ["Ada", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jade", "Kai", "Lena"]
ANIMALS = ["cat", "dog", "fox", "owl", "horse", "goat", "duck", "mouse", "bear", "frog"]
COLORS = ["red", "blue", "green", "yellow", "brown", "white", "black", "grey"]
PLACES = ["the garden", "the market", "the river", "the forest", "the school", "the harbor", "the hill"]
THINGS = ["apple", "book", "lamp", "basket", "kite", "bottle", "hat", "letter", "ball", "candle"]
VERBS = ["found", "carried", "painted", "lost", "bought", "hid", "washed", "opened"]
WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "foggy"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
           "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
           "eighteen", "nineteen", "twenty"]


def story(r: random.Random) -> str:
    a, b = r.sample(NAMES, 2)
    animal, color, place = r.choice(ANIMALS), r.choice(COLORS), r.choice(PLACES)
    thing, verb, day = r.choice(THINGS), r.choice(VERBS), r.choice(DAYS)
    n = r.randint(2, 9)
    lines = [f"On {day} the weather was {r.choice(WEATHER)}.",
             f"{a} went to {place} with a {color} {animal}.",
             f"There {a} {verb} a {thing} and gave it to {b}.",
             f"{b} said: thank you, {a}. This {thing} is {color}.",
             f"Then {a} and {b} counted {NUMBERS[n]} {animal}s near {place}.",
             f"In the evening the {color} {animal} slept and {a} went home."]
    return " ".join(lines[: r.randint(4, 6)])


def facts(r: random.Random) -> str:
    out = []
    for _ in range(r.randint(3, 6)):
        x, y = r.randint(0, 10), r.randint(0, 10)
        kind = r.randrange(4)
        if kind == 0:
            out.append(f"{NUMBERS[x]} plus {NUMBERS[y]} is {NUMBERS[x + y]}.")
        elif kind == 1:
            out.append(f"{x} + {y} = {x + y}.")
        elif kind == 2:
            s = r.randint(0, 14)
            out.append("Counting: " + " ".join(NUMBERS[s:s + 6]) + ".")
        else:
            i = r.randrange(7)
            out.append(f"After {DAYS[i]} comes {DAYS[(i + 1) % 7]}.")
    return " ".join(out)


def dialogue(r: random.Random) -> str:
    a, b = r.sample(NAMES, 2)
    thing, color = r.choice(THINGS), r.choice(COLORS)
    return (f"{a}: Where is my {color} {thing}?\n{b}: Your {color} {thing} is in {r.choice(PLACES)}.\n"
            f"{a}: Thank you, {b}.")


def make_corpus() -> str:
    r = random.Random(SEED)
    docs, size = [], 0
    while size < TARGET_BYTES:
        doc = r.choice([story, story, facts, dialogue])(r)
        docs.append(doc)
        size += len(doc) + 2
    return "\n\n".join(docs) + "\n"


def make_tokenizer(corpus_path: Path, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(corpus_path)], trainer)
    tok.save(str(out))


def main() -> None:
    corpus = HERE / "corpus.txt"
    corpus.write_text(make_corpus())
    make_tokenizer(corpus, HERE / "tokenizer.json")
    print(f"wrote {corpus} ({corpus.stat().st_size} bytes) and {HERE / 'tokenizer.json'}")


if __name__ == "__main__":
    main()
