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
4-way multiple choice, with distractor categories the word is not in under any sense. val is the
in-distribution test split of notes/experiments.md.

Two more splits, built after those three (which they leave byte for byte as they were):

  dev      hyper-parameters are chosen on it (notes/experiments.md). Words of the training
           categories that are in neither train nor val: each category gets a quota proportional
           to its share of train + val, filled first with its single words past the
           MAX_PER_CATEGORY cut, then with two-word names ("sugar maple") neither of whose words is
           a train/val word or a label word. Same filters otherwise.
  ood      out of distribution: the same task on HELD_OUT_CATEGORIES, new labels from parts of the
           noun hierarchy that no training category touches (no anchor above or below a training
           anchor, and no sense of a word under a training category). ood_choice asks them as
           4-way multiple choice among the held-out labels only.

    apt-get install wordnet-base      # WordNet 3.0 in /usr/share/wordnet
    python scripts/make_demo_data.py  # writes data/wordnet_{train,val,val_choice,dev,ood,
                                      #   ood_choice}.jsonl
    (cd data && sha256sum -c SHA256SUMS)   # the files are the ones this script writes
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
# Out-of-distribution categories: none of these anchors is above or below a training anchor
# (checked in main()), and a word is used only if none of its senses is under a training
# category. Order matters as for CATEGORIES.
HELD_OUT_CATEGORIES = [
    ("fungus", "fungus.n.01"), ("meat", "meat.n.01"), ("dish", "dish.n.02"),
    ("rock", "rock.n.02"), ("gas", "gas.n.02"), ("fuel", "fuel.n.01"),
    ("medicine", "medicine.n.02"), ("landform", "geological_formation.n.01"),
    ("body of water", "body_of_water.n.01"), ("writer", "writer.n.01"),
    ("doctor", "doctor.n.01"), ("soldier", "soldier.n.01"), ("document", "document.n.01"),
    ("religion", "religion.n.01"),
]
MAX_PER_CATEGORY = 100
MIN_FAMILIARITY = 1   # drop words never seen in a gloss and never sense-tagged
NUM_VAL = 200
NUM_DEV = 200         # about: the per-category quotas are rounded, and a few categories run short
MAX_PER_HELD_OUT = 16
NUM_CHOICES = 4
PROMPT = "Word: {word}\nCategory:"
SINGLE_WORD = r"[a-z]{3,14}"
TWO_WORDS = r"[a-z]{2,12}_[a-z]{2,12}"   # a WordNet lemma: "sugar_maple" is written "sugar maple"


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
    """How often each lowercase word, and each pair of consecutive words (as "sugar_maple"),
    occurs in all WordNet glosses: a rough familiarity score."""
    counts = collections.Counter()
    for pos in ["noun", "verb", "adj", "adv"]:
        with open(os.path.join(wordnet_dir, f"data.{pos}"), encoding="latin-1") as f:
            for line in f:
                if not line.startswith("  "):
                    words = re.findall(r"[a-z]+", line.split(" | ", 1)[1].lower())
                    counts.update(words)
                    counts.update(f"{a}_{b}" for a, b in zip(words, words[1:]))
    return counts


class Nouns:
    """WordNet's nouns with what the splits need: hypernym closure, familiarity, filters."""

    def __init__(self, wordnet_dir):
        self.synsets = read_noun_synsets(wordnet_dir)
        self.index = read_noun_index(wordnet_dir)
        self.excluded = not_only_nouns(wordnet_dir)
        self.familiarity = gloss_word_counts(wordnet_dir)
        self._ancestors = {}

    def ancestors(self, offset):
        """The synset itself and everything above it."""
        if offset not in self._ancestors:
            found, stack = set(), [offset]
            while stack:
                o = stack.pop()
                if o not in found:
                    found.add(o)
                    stack.extend(self.synsets[o][1])
            self._ancestors[offset] = found
        return self._ancestors[offset]

    def resolve(self, name):
        """"dog.n.01" -> offset of the first noun sense of "dog"."""
        lemma, _, sense = name.split(".")
        return self.index[lemma][0][int(sense) - 1]

    def anchors(self, categories):
        """[(label, offset)], checked: no category is inside one listed after it."""
        anchors = [(label, self.resolve(name)) for label, name in categories]
        for i, (label, anchor) in enumerate(anchors):
            for other_label, other in anchors[i + 1:]:
                assert anchor not in self.ancestors(other), (f"{other_label!r} is inside "
                                                             f"{label!r}: list it first")
        return anchors

    def categories_of(self, offset, anchors):
        """Every category of `anchors` the synset is under."""
        above = self.ancestors(offset)
        return [label for label, anchor in anchors if anchor in above]

    def labelled_words(self, anchors, pattern, avoid=()):
        """Words written as `pattern` in the categories of `anchors`, with the rules of the module
        docstring: {label: [(-familiarity, word)]} and {word: every category of any of its senses
        (never offered as a wrong choice)}. A word with a sense under any anchor of `avoid` is left
        out."""
        by_category = collections.defaultdict(list)
        ruled_out = {}
        for word, (offsets, tagged) in sorted(self.index.items()):
            if not re.fullmatch(pattern, word) or word in self.excluded:
                continue
            if word not in self.synsets[offsets[0]][0]:  # written with capitals: a name
                continue
            if avoid and any(self.categories_of(o, avoid) for o in offsets):
                continue
            sense_categories = [self.categories_of(o, anchors) for o in offsets]
            if not sense_categories[0]:
                continue
            label = sense_categories[0][0]  # most specific category of the most frequent sense
            if (any(cats and cats[0] != label for cats in sense_categories[1:])
                    or label.split()[-1] in word):
                continue  # ambiguous ("bass": fish or instrument) or gives the answer away
            score = self.familiarity[word] + 10 * tagged
            if score >= MIN_FAMILIARITY:
                by_category[label].append((-score, word))
                ruled_out[word] = {c for cats in sense_categories for c in cats}
        return by_category, ruled_out


def choice_record(word, label, labels, ruled_out, rng):
    """The word as 4-way multiple choice; the wrong choices are labels it has under no sense."""
    wrong = rng.sample([c for c in labels if c not in ruled_out], NUM_CHOICES - 1)
    choices = wrong + [label]
    rng.shuffle(choices)
    return {"question": PROMPT.format(word=word.replace("_", " ")),
            "choices": [" " + c for c in choices], "answer": choices.index(label)}


def completion_records(words):
    return [{"prompt": PROMPT.format(word=w.replace("_", " ")), "completion": " " + c}
            for w, c in words]


def dev_split(nouns, anchors, by_category, used, rng):
    """[(word, label)] of the dev split: per training category a quota proportional to its share
    of `used` (train + val), from its single words past the cut, then its two-word names."""
    used_words = {w for w, _ in used}
    label_words = {part for label, _ in CATEGORIES for part in label.split()}
    anchor_lemmas = {lemma.lower() for _, a in anchors for lemma in nouns.synsets[a][0]}
    compounds, _ = nouns.labelled_words(anchors, TWO_WORDS)
    counts = collections.Counter(label for _, label in used)
    dev = []
    for label, _ in CATEGORIES:
        quota = round(NUM_DEV * counts[label] / len(used))
        singles = [w for _, w in sorted(by_category[label])[MAX_PER_CATEGORY:]]
        twos = [w for _, w in sorted(compounds[label])
                if w not in anchor_lemmas
                and not any(p in used_words or p in label_words for p in w.split("_"))]
        dev += [(w, label) for w in (singles + twos)[:quota]]
    rng.shuffle(dev)
    return dev


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
    nouns = Nouns(args.wordnet_dir)

    # ---- train / val (the in-distribution test split) / val_choice
    anchors = nouns.anchors(CATEGORIES)
    by_category, ruled_out = nouns.labelled_words(anchors, SINGLE_WORD)
    words = []  # (word, label)
    for label, _ in CATEGORIES:
        words += [(word, label) for _, word in sorted(by_category[label])[:MAX_PER_CATEGORY]]
    rng = random.Random(args.seed)
    rng.shuffle(words)
    val, train = words[:NUM_VAL], words[NUM_VAL:]
    labels = [label for label, _ in CATEGORIES]
    val_choice = [choice_record(w, label, labels, ruled_out[w], rng) for w, label in val]

    # ---- dev: unseen words of the training categories (own random stream: the files above
    #      stay as they were)
    dev = dev_split(nouns, anchors, by_category, words, random.Random(args.seed + 1))

    # ---- ood: held-out categories
    held_out = nouns.anchors(HELD_OUT_CATEGORIES)
    for label, anchor in held_out:
        for train_label, train_anchor in anchors:
            assert (anchor not in nouns.ancestors(train_anchor)
                    and train_anchor not in nouns.ancestors(anchor)), (label, train_label)
    ood_by_category, ood_ruled_out = nouns.labelled_words(held_out, SINGLE_WORD, avoid=anchors)
    ood = []
    for label, _ in HELD_OUT_CATEGORIES:
        ood += [(w, label) for _, w in sorted(ood_by_category[label])[:MAX_PER_HELD_OUT]]
    rng_ood = random.Random(args.seed + 2)
    rng_ood.shuffle(ood)
    ood_labels = [label for label, _ in HELD_OUT_CATEGORIES]
    ood_choice = [choice_record(w, label, ood_labels, ood_ruled_out[w], rng_ood)
                  for w, label in ood]
    splits = [{w for w, _ in split} for split in (train, val, dev, ood)]
    assert all(not a & b for i, a in enumerate(splits) for b in splits[i + 1:]), "splits overlap"

    def write(name, records):
        path = os.path.join(args.out_dir, name)
        with open(path, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        print(f"{path}: {len(records)} records, {os.path.getsize(path) / 1024:.0f} KiB")

    os.makedirs(args.out_dir, exist_ok=True)
    write("wordnet_train.jsonl", completion_records(train))
    write("wordnet_val.jsonl", completion_records(val))
    write("wordnet_val_choice.jsonl", val_choice)
    write("wordnet_dev.jsonl", completion_records(dev))
    write("wordnet_ood.jsonl", completion_records(ood))
    write("wordnet_ood_choice.jsonl", ood_choice)
    for name, split in (("train + val", words), ("dev", dev), ("ood", ood)):
        counts = collections.Counter(label for _, label in split)
        two = sum("_" in w for w, _ in split)
        print(f"{name}: {len(counts)} categories, words per category "
              f"{min(counts.values())}..{max(counts.values())}, {two} two-word names")


if __name__ == "__main__":
    main()
