"""
Build the demo dataset in data/ from WordNet 3.0: "which category is this noun in?"

    {"prompt": "Word: sparrow\nCategory:", "completion": " bird"}

Each word is a WordNet noun whose hypernym chain (is-a links: sparrow -> passerine -> bird -> ...)
reaches one of the CATEGORIES below; its label is the first category on that list it falls under
(the list puts specific categories before the general ones that contain them: dog before mammal).
Only unambiguous words are used: a single lowercase word, only ever a noun in WordNet, and every
noun sense that has a category has the same one. Words are ranked by how familiar they are (how
often they occur in WordNet's own glosses, plus their sense-tagged corpus count) and each category
keeps its MAX_PER_CATEGORY most familiar words, so the task leans on words a small model has seen.
The words are then split into train / val at random (fixed seed); val_choice asks the val words as
4-way multiple choice, with distractor categories the word is not in under any sense.

    apt-get install wordnet-base      # WordNet 3.0 in /usr/share/wordnet
    python scripts/make_demo_data.py  # writes data/wordnet_{train,val,val_choice}.jsonl
"""

import argparse
import collections
import json
import os
import random
import re

# (label, anchor synset as "lemma.n.sense-number"); a category is the anchor and everything
# below it.
# Order matters: a category must come before any category that contains it (checked in main()).
CATEGORIES = [
    ("dog", "dog.n.01"), ("bird", "bird.n.01"), ("fish", "fish.n.01"), ("insect", "insect.n.01"),
    ("snake", "snake.n.01"), ("reptile", "reptile.n.01"), ("mollusk", "mollusk.n.01"),
    ("mammal", "mammal.n.01"), ("tree", "tree.n.01"), ("flower", "flower.n.01"),
    ("vegetable", "vegetable.n.01"), ("fruit", "edible_fruit.n.01"), ("bread", "bread.n.01"),
    ("sauce", "sauce.n.01"), ("drink", "beverage.n.01"), ("boat", "vessel.n.02"),
    ("vehicle", "vehicle.n.01"), ("weapon", "weapon.n.01"), ("tool", "tool.n.01"),
    ("clothing", "clothing.n.01"), ("furniture", "furniture.n.01"), ("room", "room.n.01"),
    ("building", "building.n.01"), ("instrument", "musical_instrument.n.01"),
    ("container", "container.n.01"), ("disease", "disease.n.01"), ("sport", "sport.n.01"),
    ("game", "game.n.01"), ("metal", "metal.n.01"), ("gem", "gem.n.02"),
    ("mineral", "mineral.n.01"), ("fabric", "fabric.n.01"), ("bone", "bone.n.01"),
    ("body part", "body_part.n.01"), ("currency", "monetary_unit.n.01"),
    ("unit", "unit_of_measurement.n.01"), ("crime", "crime.n.01"), ("science", "science.n.01"),
    ("emotion", "emotion.n.01"), ("relative", "relative.n.01"), ("musician", "musician.n.01"),
    ("athlete", "athlete.n.01"), ("scientist", "scientist.n.01"), ("criminal", "criminal.n.01"),
]
MAX_PER_CATEGORY = 100
MIN_FAMILIARITY = 1   # drop words never seen in a gloss and never sense-tagged
NUM_VAL = 200
NUM_CHOICES = 4
PROMPT = "Word: {word}\nCategory:"


def read_noun_synsets(wordnet_dir):
    """data.noun -> {offset: (lemmas as written, hypernym offsets)}. Only '@' (is-a) links are
    followed; '@i' (instance of) links lead to proper names, which are not wanted."""
    synsets = {}
    with open(os.path.join(wordnet_dir, "data.noun"), encoding="latin-1") as f:
        for line in f:
            if line.startswith("  "):  # licence header
                continue
            fields = line.split(" | ", 1)[0].split()
            n_words = int(fields[3], 16)
            lemmas = [fields[4 + 2 * i] for i in range(n_words)]
            k = 4 + 2 * n_words
            n_pointers = int(fields[k])
            pointers = [fields[k + 1 + 4 * i: k + 5 + 4 * i] for i in range(n_pointers)]
            synsets[fields[0]] = (lemmas, [offset for symbol, offset, _, _ in pointers
                                           if symbol == "@"])
    return synsets


def read_noun_index(wordnet_dir):
    """index.noun -> {lemma: (synset offsets in sense order, tagged sense count)}."""
    index = {}
    with open(os.path.join(wordnet_dir, "index.noun"), encoding="latin-1") as f:
        for line in f:
            if line.startswith("  "):
                continue
            fields = line.split()
            n_pointer_kinds = int(fields[3])
            rest = fields[4 + n_pointer_kinds:]  # sense_cnt, tagsense_cnt, offsets...
            index[fields[0]] = (rest[2:], int(rest[1]))
    return index


def not_only_nouns(wordnet_dir):
    """Words that are also verbs/adjectives/adverbs, or inflected forms of
    something ('won', 'are')."""
    words = set()
    for name in ["index.verb", "index.adj", "index.adv", "noun.exc", "verb.exc", "adj.exc",
                 "adv.exc"]:
        with open(os.path.join(wordnet_dir, name), encoding="latin-1") as f:
            words.update(line.split()[0] for line in f if not line.startswith("  "))
    return words


def gloss_word_counts(wordnet_dir):
    """How often each lowercase word occurs in all WordNet glosses: a rough familiarity score."""
    counts = collections.Counter()
    for pos in ["noun", "verb", "adj", "adv"]:
        with open(os.path.join(wordnet_dir, f"data.{pos}"), encoding="latin-1") as f:
            for line in f:
                if not line.startswith("  "):
                    counts.update(re.findall(r"[a-z]+", line.split(" | ", 1)[1].lower()))
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wordnet-dir", default="/usr/share/wordnet")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--out-dir", default=os.path.join(repo, "data"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not os.path.exists(os.path.join(args.wordnet_dir, "data.noun")):
        raise SystemExit(f"no WordNet in {args.wordnet_dir}; "
                         f"run `apt-get install wordnet-base` or pass --wordnet-dir")

    synsets = read_noun_synsets(args.wordnet_dir)
    index = read_noun_index(args.wordnet_dir)
    excluded = not_only_nouns(args.wordnet_dir)
    familiarity = gloss_word_counts(args.wordnet_dir)

    ancestor_cache = {}

    def ancestors(offset):  # the synset itself and everything above it
        if offset not in ancestor_cache:
            found, stack = set(), [offset]
            while stack:
                o = stack.pop()
                if o not in found:
                    found.add(o)
                    stack.extend(synsets[o][1])
            ancestor_cache[offset] = found
        return ancestor_cache[offset]

    def resolve(name):  # "dog.n.01" -> offset of the first noun sense of "dog"
        lemma, _, sense = name.split(".")
        return index[lemma][0][int(sense) - 1]

    anchors = [(label, resolve(name)) for label, name in CATEGORIES]
    for i, (label, anchor) in enumerate(anchors):
        for other_label, other in anchors[i + 1:]:
            assert anchor not in ancestors(other), (f"{other_label!r} is inside {label!r}: "
                                                    f"list it first")

    def categories_of(offset):  # every category the synset is under
        above = ancestors(offset)
        return [label for label, anchor in anchors if anchor in above]

    by_category = collections.defaultdict(list)
    # word -> categories it must not be offered as a wrong choice (any sense is in them)
    ruled_out = {}
    for word, (offsets, tagged) in sorted(index.items()):
        if not re.fullmatch(r"[a-z]{3,14}", word) or word in excluded:
            continue
        if word not in synsets[offsets[0]][0]:  # written with capitals in its synset: a name
            continue
        sense_categories = [categories_of(o) for o in offsets]
        if not sense_categories[0]:
            continue
        label = sense_categories[0][0]  # most specific category of the most frequent sense
        if (any(cats and cats[0] != label for cats in sense_categories[1:])
                or label.split()[-1] in word):
            continue  # ambiguous ("bass": fish or instrument) or gives the answer away ("catfish")
        score = familiarity[word] + 10 * tagged
        if score >= MIN_FAMILIARITY:
            by_category[label].append((-score, word))
            ruled_out[word] = {c for cats in sense_categories for c in cats}

    words = []  # (word, label)
    for label, _ in CATEGORIES:
        words += [(word, label) for _, word in sorted(by_category[label])[:MAX_PER_CATEGORY]]
    rng = random.Random(args.seed)
    rng.shuffle(words)
    val, train = words[:NUM_VAL], words[NUM_VAL:]

    labels = [label for label, _ in CATEGORIES]
    choice_records = []
    for word, label in val:
        wrong = rng.sample([c for c in labels if c not in ruled_out[word]], NUM_CHOICES - 1)
        choices = wrong + [label]
        rng.shuffle(choices)
        choice_records.append({"question": PROMPT.format(word=word),
                               "choices": [" " + c for c in choices],
                               "answer": choices.index(label)})

    def write(name, records):
        path = os.path.join(args.out_dir, name)
        with open(path, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        print(f"{path}: {len(records)} records, {os.path.getsize(path) / 1024:.0f} KiB")

    os.makedirs(args.out_dir, exist_ok=True)
    write("wordnet_train.jsonl",
          [{"prompt": PROMPT.format(word=w), "completion": " " + c} for w, c in train])
    write("wordnet_val.jsonl",
          [{"prompt": PROMPT.format(word=w), "completion": " " + c} for w, c in val])
    write("wordnet_val_choice.jsonl", choice_records)
    counts = collections.Counter(label for _, label in words)
    print(f"{len(counts)} categories, "
          f"words per category {min(counts.values())}..{max(counts.values())}")


if __name__ == "__main__":
    main()
