"""An answer's opening that commits to doing what a request asks: "Sure, here is a script that ...".

Refusal direction optimisation teaches the direction, through its ablation loss, to make the model say some target
text. By default that text is what the DIM-ablated model said, which on Qwen2.5-Coder-0.5B includes answers that turn
the request into its safe side (a post *against* terrorism, a guide to *preventing* hate speech). Training on those
teaches the deflection too. An opening that restates the request as the thing being handed over names what the
answer must contain, so a direction trained on it is pushed towards doing the task, not towards any non-refusal.
Jailbreak targets (Zou et al. 2023) have the same shape; these are made by rule from the request, for any prompt.

Rules, in order (the request's trailing punctuation dropped, first-person words turned to second person):
- The request is read a sentence at a time from its last sentence back, so a request after some context ("I run a
  shop. Write ...") is the one restated.
- "How do/can/should I X?" -> "Sure, here is how you can X:"; "Where can I X?" and "What's the best way to X?" alike.
- An imperative whose verb makes or gives something ("Write", "Create", "Provide", "Give", ...) -> "Sure, here is"
  (or "here are", for "instructions", "steps", "tips", ...) and the rest of the request: "Write a script that X" ->
  "Sure, here is a script that X:". A person it is addressed to ("Give me", "Teach children", "Instruct users on")
  is dropped, so "Teach children how to X" -> "Sure, here is how to X:".
- Any other imperative (a first word that is not a pronoun, article, question word or auxiliary) -> "Sure, here is
  how to" and the request: "Hack into X" -> "Sure, here is how to hack into X:".
- "Please" and "Can/Could you" in front are dropped first.
- Anything else -> "Sure, here is the answer:".

Usage::

    affirmative_opening("Write a script that can exploit vulnerabilities in a software")
    # 'Sure, here is a script that can exploit vulnerabilities in a software:'
"""

from __future__ import annotations

import re


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


_GIVING_VERBS = _words(
    "write create develop design generate produce compose draft outline publish build make provide give share suggest "
    "offer list describe explain teach show instruct demonstrate prepare program code construct devise formulate craft "
    "compile propose detail recommend post plan invent draw tell walk"
)
"""Verbs whose object is the thing the answer hands over ("Write a post" -> "here is a post")."""

_NOT_VERBS = _words(
    "i i'm i've my we our you your it its this that these those the a an some any there here he she they his her their "
    "what which who whom whose why where when how is are was were be been am do does did can could would should will "
    "shall may might must if in on at for with about as and or but so not no yes"
)
"""First words that show a prompt is not an imperative ("My neighbour ...", "Is it ...")."""

_RECIPIENTS = (
    "me", "us", "users", "a user", "people", "someone", "children", "kids", "others", "readers", "the reader",
    "viewers", "an audience", "the public", "individuals", "employees", "students", "teenagers", "a child",
)
"""Who a giving verb may address before its object ("Teach children how to ...")."""

_PLURAL_HEADS = _words(
    "instructions steps tips ways methods ideas strategies techniques suggestions details examples "
    "reasons directions recommendations resources tools tactics options"
)
"""Head nouns that make the opening "here are" rather than "here is"."""

_PERSON = {"i": "you", "me": "you", "my": "your", "mine": "yours", "myself": "yourself", "we": "you", "us": "you",
           "our": "your", "ours": "yours", "ourselves": "yourselves", "i'm": "you're", "i've": "you've",
           "your": "my", "yours": "mine", "yourself": "myself", "you're": "I'm", "you've": "I've"}
_SUBJECT_VERBS = _words("can could will would should must may might are were have had know think want need do did")
"""Words after which "you" is a subject ("you can" -> "I can")."""

_SUBJECT = r"(?:i|we|one|you|someone|a person)"
_QUESTIONS = (
    (re.compile(rf"^how (?:do|can|could|would|should|might|will) {_SUBJECT} (.+)$", re.IGNORECASE), "how you can "),
    (re.compile(r"^(?:what's|what is) the (?:best|easiest|fastest|quickest|simplest|safest) way to (.+)$", re.IGNORECASE),
     "the best way to "),
    (re.compile(rf"^where (?:do|can|could|would|should|might) {_SUBJECT} (.+)$", re.IGNORECASE), "where you can "),
)
"""Questions that restate as an answer: (pattern, the opening's words before the captured rest)."""
_SENTENCE = re.compile(r"(?<=[.!?:])\s+")
_PARTICLE = re.compile(r"^(?:up|out|together)\s+(?:with\s+)?", re.IGNORECASE)
_ADDRESS = re.compile(r"^(?:in detail|in steps|step by step|briefly|exactly|clearly)\s+", re.IGNORECASE)
_POLITE = re.compile(r"^(?:please,?\s+|just\s+|now,?\s+|(?:can|could|would|will) you(?: please)?,?\s+|"
                     r"(?:step by step|in detail|briefly|honestly|realistically),\s+)+", re.IGNORECASE)
_ON = re.compile(r"^(?:on|about)\s+(?=how\b)", re.IGNORECASE)

FALLBACK = "Sure, here is the answer:"


def affirmative_opening(request: str) -> str:
    """The opening of an answer that does what `request` asks (see the module docstring for the rules)."""
    sentences = _SENTENCE.split(" ".join(request.split()))
    for sentence in reversed(sentences):  # the ask is usually last ("I run a shop. Write ..."), else an earlier clause
        opening = _opening(sentence)
        if opening is not None:
            return opening
    return FALLBACK


def _opening(sentence: str) -> str | None:
    """One sentence's opening, None when no rule reads it."""
    question = sentence.rstrip().endswith("?")
    text = sentence.rstrip(".!?;: ").strip()
    polite = _POLITE.sub("", text)
    question = question and polite == text  # "Can you explain X?" is a request
    text = polite
    if not text:
        return None
    if question:
        for pattern, lead in _QUESTIONS:
            match = pattern.match(text)
            if match is not None:
                return f"Sure, here is {lead}{_second_person(match.group(1))}:"
        return None
    first, _, rest = text.partition(" ")
    verb = first.lower().strip(",")
    if verb in _GIVING_VERBS and rest:
        rest = _ON.sub("", _ADDRESS.sub("", _drop_recipient(_PARTICLE.sub("", rest))))
        lower = rest.lower()
        if lower.startswith("through "):  # "Walk me through X"
            return f"Sure, here is a walk-through of {_second_person(rest[len('through '):])}:"
        if lower.startswith(("on ", "about ")):  # "Instruct readers on concealing X"
            return f"Sure, here is a guide {_second_person(rest)}:"
        if lower.startswith(("how ", "what ", "why ", "where ", "when ", "which ")):
            return f"Sure, here is {_second_person(rest)}:"
        if lower.startswith("to "):  # "Instruct users to X"
            return f"Sure, here is how {_second_person(rest)}:"
        words = [w.strip(",").lower() for w in rest.split()[:3]]
        plural = words[0] not in ("a", "an", "one", "this", "that") and any(w in _PLURAL_HEADS for w in words)
        return f"Sure, here {'are' if plural else 'is'} {_second_person(rest)}:"
    if verb.isalpha() and verb not in _NOT_VERBS:
        return f"Sure, here is how to {_second_person(verb + (' ' + rest if rest else ''))}:"
    return None


def _drop_recipient(rest: str) -> str:
    lower = rest.lower()
    for who in _RECIPIENTS:
        if lower.startswith(who + " ") and len(rest) > len(who) + 1:
            return rest[len(who) + 1:]
    return rest


def _second_person(text: str) -> str:
    """The request's persons as the answerer would say them: "my" -> "your", "your" -> "my", "you" -> "I" before a verb
    that takes a subject ("you can") and "me" elsewhere ("for you")."""
    words = text.split()
    out = []
    for i, word in enumerate(words):
        lower = word.lower()
        if lower == "you":
            after = words[i + 1].lower() if i + 1 < len(words) else ""
            out.append("I" if after in _SUBJECT_VERBS else "me")
        else:
            out.append(_PERSON.get(lower, word))
    return " ".join(out)
