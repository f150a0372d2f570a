"""The paper's evaluation metrics as plain functions (no model, no torch): VQA accuracy with the standard answer
normalisation, CHAIR_i / CHAIR_s object hallucination (Rohrbach et al. 2018), the caption-coverage judge's
prompt and its yes/no parsing. eval.py runs the model and calls these; tests/test_eval.py checks them by hand."""
import json
import os
import re

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")

# ------------------------------------------------------------------------------------------------- VQA
# The VQA challenge's answer normalisation (lower case, punctuation, number words, articles, contractions):
# AOK-VQA and GQA answers are compared after it.
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                "wont": "won't", "didnt": "didn't", "wasnt": "wasn't", "werent": "weren't", "hasnt": "hasn't",
                "havent": "haven't", "couldnt": "couldn't", "shouldnt": "shouldn't", "wouldnt": "wouldn't",
                "im": "i'm", "ive": "i've", "youre": "you're", "theyre": "they're", "thats": "that's",
                "whats": "what's", "its": "it's", "lets": "let's"}
PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit (3.5 stays, "2." -> "2"), as the official code
COMMA_IN_NUMBER = re.compile(r"(\d),(\d)")


def normalize_answer(text):
    """'The Two dogs!' -> '2 dogs'; '1,000' -> '1000'; 'dont' -> "don't"; '3.5' stays."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    for p in PUNCT:  # next to a space (or in a number with a comma): dropped; inside a word: a space
        glued = (p + " " in text or " " + p in text or COMMA_IN_NUMBER.search(text))
        text = text.replace(p, "" if glued else " ")
    text = PERIOD.sub("", text)
    words = [CONTRACTIONS.get(NUMBERS.get(w, w), NUMBERS.get(w, w)) for w in text.split()]
    return " ".join(w for w in words if w not in ARTICLES)


def vqa_score(prediction, answers):
    """Several reference answers (AOK-VQA direct answers): min(#equal / 3, 1); one answer (GQA): exact match.
    Both after normalize_answer."""
    pred = normalize_answer(prediction)
    refs = [normalize_answer(a) for a in ([answers] if isinstance(answers, str) else answers)]
    if not refs:
        raise ValueError("a question without reference answers")
    agree = sum(pred == a for a in refs)
    return min(agree / 3, 1.0) if len(refs) > 1 else float(agree)


def vqa_accuracy(items):
    """items: [{"prediction", "answers", "type"?}] -> {"accuracy", "n", "per_type": {type: {"accuracy", "n"}}}."""
    per = {}
    for it in items:
        per.setdefault(it.get("type", "all"), []).append(vqa_score(it["prediction"], it["answers"]))
    scores = [s for v in per.values() for s in v]
    return {"accuracy": sum(scores) / max(len(scores), 1), "n": len(scores),
            "per_type": {t: {"accuracy": sum(v) / len(v), "n": len(v)} for t, v in sorted(per.items())}}


# ------------------------------------------------------------------------------------------------ CHAIR
IRREGULAR = {"men": "man", "women": "woman", "children": "child", "mice": "mouse", "knives": "knife",
             "geese": "goose", "feet": "foot", "teeth": "tooth", "leaves": "leaf", "wolves": "wolf"}
QUALIFIERS = {"baby", "adult", "passenger"}  # "baby elephant" is an elephant, not a person (as the original)


def load_vocab(name_or_path):
    """'coco' | 'shapes' | a JSON file {category: [words naming it]} -> {word or two-word phrase: category}."""
    path = os.path.join(ASSETS, f"{name_or_path}_synonyms.json") if name_or_path in ("coco", "shapes") else name_or_path
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable synonym table ({e})") from None
    return {w: cat for cat, words in table.items() if not cat.startswith("_") for w in [cat, *words]}


def singular_forms(word):
    """Candidate singulars of an English plural, most likely first (the word itself first)."""
    out = [word, IRREGULAR.get(word, word)]
    if word.endswith("ies"):
        out.append(word[:-3] + "y")
    if word.endswith("ves"):
        out += [word[:-3] + "f", word[:-3] + "fe"]
    if word.endswith("es"):
        out.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss"):
        out.append(word[:-1])
    return out


def mentioned_objects(text, vocab):
    """Every mention of a vocabulary object in `text`, in order, as (words, category); repeated mentions count
    (as the original chair.py). Two-word names first ('hot dog' is not a dog, 'teddy bear' not a bear)."""
    words = re.findall(r"[a-z]+", text.lower())
    found, i = [], 0
    while i < len(words):
        for n in (2, 1):
            if i + n > len(words):
                continue
            head = " ".join(words[i:i + n - 1])
            hit = next((head + (" " if head else "") + s for s in singular_forms(words[i + n - 1])
                        if (head + (" " if head else "") + s) in vocab), None)
            if hit and not (n == 1 and words[i] in QUALIFIERS and i + 1 < len(words)
                            and any(s in vocab for s in singular_forms(words[i + 1]))):
                found.append((" ".join(words[i:i + n]), vocab[hit]))
                i += n
                break
        else:
            i += 1
    if any(c == "toilet" for _, c in found):  # "toilet seat" is not a chair (as the original)
        found = [(w, c) for w, c in found if w != "seat"]
    return found


def chair(captions, ground_truth, vocab):
    """captions[i] describes an image holding the objects ground_truth[i] (words or categories) -> CHAIR_i (share
    of object mentions that are hallucinated), CHAIR_s (share of captions with one or more), average length in
    words, and each caption's hallucinated mentions."""
    mentions = hallucinated = bad_captions = words = 0
    details = []
    for cap, gt in zip(captions, ground_truth, strict=True):
        truth = {vocab.get(g.lower(), g.lower()) for g in gt}
        truth |= {c for g in gt for _, c in mentioned_objects(g, vocab)}  # "red circle" -> circle
        found = mentioned_objects(cap, vocab)
        wrong = [(w, c) for w, c in found if c not in truth]
        mentions, hallucinated = mentions + len(found), hallucinated + len(wrong)
        bad_captions += bool(wrong)
        words += len(cap.split())
        details.append({"hallucinated": wrong, "mentioned": found})
    n = max(len(captions), 1)
    return {"chair_i": hallucinated / max(mentions, 1), "chair_s": bad_captions / n, "avg_len": words / n,
            "mentions": mentions, "hallucinated": hallucinated, "n": len(captions), "details": details}


# -------------------------------------------------------------------------------------- caption coverage
# The judge's prompt. Reconstructed from the paper's description of its Appendix A.3 (the paper's text could not
# be read offline): the judge sees one reference caption and the generated description and answers yes or no.
COVERAGE_PROMPT = ("Here is a ground-truth caption of an image and a description generated for the same image.\n"
                   "Ground-truth caption: {reference}\nGenerated description: {generated}\n"
                   "Does the generated description cover all the objects and visual relations in the ground-truth "
                   "caption? Answer with yes or no.")


def parse_yes_no(text):
    """The judge's reply -> True (yes), False (no) or None (neither): the first standalone yes/no word counts."""
    m = re.search(r"\b(yes|no)\b", text.lower())
    return None if m is None else m.group(1) == "yes"


def coverage(verdicts):
    """verdicts: True/False/None per description -> success rate (None, unparsed, counts as not covered)."""
    n = max(len(verdicts), 1)
    return {"success_rate": sum(v is True for v in verdicts) / n, "n": len(verdicts),
            "unparsed": sum(v is None for v in verdicts)}


def table(rows, headers):
    """A plain-text table (one screen): rows of values, numbers to 3 decimals."""
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    width = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, width))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in width]), *map(line, cells)])
