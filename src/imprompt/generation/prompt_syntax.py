"""AUTOMATIC1111's prompt syntax, as pure functions of the text (no model, no torch).

Three layers, applied in A1111's order (``modules/prompt_parser.py``, ``modules/extra_networks.py``):

1. :func:`extract_networks` takes the extra-network tags out: ``<lora:NAME:TE:UNET>`` (or ``te=``,
   ``unet=``; UNET defaults to TE, TE to 1). The prompt as written, tags included, is what PNG info keeps.
2. :func:`prompt_schedule` resolves prompt editing ``[from:to:when]``, ``[to:when]``, ``[from::when]`` and
   alternation ``[a|b]`` into the texts of each part of the run.
3. :func:`parse_emphasis` splits one such text into (text, weight) runs: ``(x)`` x1.1, ``[x]`` /1.1,
   ``(x:1.3)``, nesting multiplies, ``\\(`` escapes, and ``BREAK`` (weight -1), which starts a new
   75-token chunk (see :mod:`imprompt.generation.text_encoding`).

Each step of the run uses one text; A1111's step rule is kept exactly (:func:`text_at_step`), including
its alternation starting with the first option for two steps.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

# --- extra networks ------------------------------------------------------------------------------------

NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")  # A1111's re_extra_net
LORA_KINDS = ("lora", "lyco")  # "lyco" is an alias A1111 keeps for LyCORIS files, read by the same loader


@dataclass(frozen=True)
class NetworkTag:
    """One ``<kind:name:...>`` tag. For LoRA: ``te`` multiplies the text-encoder part, ``unet`` the UNet's."""

    kind: str
    name: str
    te: float = 1.0
    unet: float = 1.0
    written: str = ""  # the tag as it appeared, for messages


def _number(text: str, tag: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{tag}: the {what} multiplier must be a number, got {text!r} "
                         "(write <lora:NAME:WEIGHT> or <lora:NAME:TE:UNET>)") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{tag}: the {what} multiplier must be finite, got {text!r}")
    return value


def parse_network(kind: str, arguments: str, written: str = "") -> NetworkTag:
    """A1111's rule: ``:``-separated items, ``key=value`` items are named, the rest positional;
    te = positional[1] (default 1), then ``te=``; unet = positional[2] (default te), then ``unet=``.
    A third positional item (``dyn``, for LyCORIS dynamic rank) is accepted and ignored."""
    positional, named = [], {}
    for item in arguments.split(":"):
        key, sep, value = item.partition("=")
        if sep:
            named[key.strip()] = value
        else:
            positional.append(item)
    if not positional or not positional[0].strip():
        raise ValueError(f"{written or kind}: no name given (write <{kind}:NAME:WEIGHT>)")
    te = _number(positional[1], written, "text-encoder") if len(positional) > 1 else 1.0
    te = _number(named["te"], written, "text-encoder") if "te" in named else te
    unet = _number(positional[2], written, "UNet") if len(positional) > 2 else te
    unet = _number(named["unet"], written, "UNet") if "unet" in named else unet
    return NetworkTag(kind, positional[0].strip(), te, unet, written)


def extract_networks(text: str) -> tuple[str, list[NetworkTag]]:
    """The prompt without its extra-network tags, and the tags in order. Tags other than LoRA
    (hypernetworks, ...) are refused: imprompt does not load them, and ignoring one would change the
    picture the user asked for without a word."""
    tags: list[NetworkTag] = []

    def take(match: re.Match) -> str:
        kind = match.group(1).lower()
        if kind not in LORA_KINDS:
            raise ValueError(f"{match.group(0)}: imprompt loads LoRA tags (<lora:NAME:WEIGHT>), not "
                             f"'{match.group(1)}' networks; remove the tag")
        tags.append(parse_network("lora", match.group(2), match.group(0)))
        return ""

    return NETWORK_TAG.sub(take, text), tags


# --- prompt editing and alternation ---------------------------------------------------------------------
#
# The grammar A1111 parses with lark:
#   start: (prompt | /[][():]/+)*          junk brackets are kept as text at the top level
#   prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
#   emphasized: "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"     (kept as text)
#   scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
#   alternate: "[" prompt ("|" [prompt])+ "]"
#   plain: /([^\\\[\]():|]|\\.)+/
# A text the grammar rejects is used unchanged at every step. Below: a recursive-descent parser of the
# same language into a small tree, then the two walks A1111 makes over it.

_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+", re.S)
_NUMBER = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*\]")


@dataclass
class _Scheduled:
    before: list
    after: list
    when: str | int  # the number as written; an int step once resolved


@dataclass
class _Alternate:
    options: list[list]


class _Reject(Exception):
    pass


class _Parser:
    def __init__(self, text: str):
        self.text = text

    def prompt(self, i: int, top: bool = False) -> tuple[list, int]:
        """Items (str | _Scheduled | _Alternate) from i until a character that closes or separates. At the
        top level a bracket that does not parse ends the run there (the caller keeps it as text); inside a
        bracket it rejects the enclosing construct, as the grammar allows junk only at the top."""
        items: list = []
        while i < len(self.text):
            c = self.text[i]
            if c in "([":
                try:
                    part, i = (self.emphasized if c == "(" else self.bracket)(i)
                except _Reject:
                    if top:
                        break
                    raise
                items += part
            elif (m := _PLAIN.match(self.text, i)) is not None:
                items.append(m.group(0))
                i = m.end()
            else:  # one of ) ] : | or a lone backslash
                break
        return items, i

    def emphasized(self, i: int) -> tuple[list, int]:
        inner, j = self.prompt(i + 1)
        if j < len(self.text) and self.text[j] == ")":
            return ["(", *inner, ")"], j + 1
        if j < len(self.text) and self.text[j] == ":":
            weight, k = self.prompt(j + 1)
            if k < len(self.text) and self.text[k] == ")":
                return ["(", *inner, ":", *weight, ")"], k + 1
        raise _Reject

    def bracket(self, i: int) -> tuple[list, int]:
        first, j = self.prompt(i + 1)
        end = len(self.text)
        if j < end and self.text[j] == "]":
            return ["[", *first, "]"], j + 1
        if j < end and self.text[j] == "|":
            options = [first]
            while j < end and self.text[j] == "|":
                option, j = self.prompt(j + 1)
                options.append(option)
            if j < end and self.text[j] == "]":
                return [_Alternate(options)], j + 1
            raise _Reject
        if j < end and self.text[j] == ":":
            if m := _NUMBER.match(self.text, j + 1):  # [to:when]
                return [_Scheduled([], first, m.group(1))], m.end()
            second, k = self.prompt(j + 1)
            if k < end and self.text[k] == ":" and (m := _NUMBER.match(self.text, k + 1)):
                return [_Scheduled(first, second, m.group(1))], m.end()
        raise _Reject

    def start(self) -> list:
        items: list = []
        i = 0
        while i < len(self.text):
            part, j = self.prompt(i, top=True)
            if j == i:  # a bracket that does not parse, a stray closer or colon: kept as text
                if self.text[i] not in "[]():":
                    raise _Reject  # "|" or a trailing backslash outside any bracket: lark rejects the text
                part, j = [self.text[i]], i + 1
            items += part
            i = j
        return items


def _walk(items: list) -> Iterator:
    for item in items:
        yield item
        if isinstance(item, _Scheduled):
            yield from _walk(item.before)
            yield from _walk(item.after)
        elif isinstance(item, _Alternate):
            for option in item.options:
                yield from _walk(option)


def _text_of(items: list, step: int) -> str:
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, _Scheduled):
            out.append(_text_of(item.before if step <= item.when else item.after, step))
        else:
            out.append(_text_of(item.options[(step - 1) % len(item.options)], step))
    return "".join(out)


def prompt_schedule(text: str, steps: int) -> list[tuple[int, str]]:
    """[(last step, text)], ascending: the text to use up to and including that step (see
    :func:`text_at_step`). ``when`` with a decimal point is a fraction of ``steps``, without one a step
    number (A1111's current rule), capped at ``steps``; alternation changes the text every step."""
    try:
        tree = _Parser(text).start()
    except _Reject:
        return [(steps, text)]
    ends = {steps}
    for node in _walk(tree):
        if isinstance(node, _Scheduled):
            value = float(node.when)
            node.when = min(steps, int(value * steps if "." in str(node.when) else value))
            if node.when >= 1:
                ends.add(node.when)
        elif isinstance(node, _Alternate):
            ends.update(range(1, steps + 1))
    return [(end, _text_of(tree, end)) for end in sorted(ends)]


def text_at_step(schedule: Sequence[tuple[int, str]], step: int) -> str:
    """The text of 0-based sampling step ``step``: the first entry whose last step is >= it (A1111's
    ``reconstruct_cond_batch``; step 0 and step 1 therefore share the first entry)."""
    for end, text in schedule:
        if step <= end:
            return text
    return schedule[-1][1]


# --- emphasis ------------------------------------------------------------------------------------------

_ATTENTION = re.compile(r"""
    \\\( | \\\) | \\\[ | \\\] | \\\\ | \\      # escapes (a lone backslash is itself)
  | \( | \[                                    # openers
  | :\s*([+-]?[.\d]+)\s*\)                     # ":1.3)" closes a weighted group
  | \) | \]
  | [^\\()\[\]:]+                              # text
  | :
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
ROUND = 1.1
SQUARE = 1 / 1.1


@dataclass
class Run:
    text: str
    weight: float


BREAK = "BREAK"


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """(text, weight) runs in order, neighbours of equal weight merged; ``("BREAK", -1.0)`` marks a
    chunk break. Unclosed brackets still apply to the end of the text; a stray closer is text."""
    runs: list[Run] = []
    rounds: list[int] = []
    squares: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for run in runs[start:]:
            run.weight *= factor

    for m in _ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            runs.append(Run(token[1:], 1.0))
        elif token == "(":
            rounds.append(len(runs))
        elif token == "[":
            squares.append(len(runs))
        elif weight is not None and rounds:
            multiply(rounds.pop(), float(weight))
        elif token == ")" and rounds:
            multiply(rounds.pop(), ROUND)
        elif token == "]" and squares:
            multiply(squares.pop(), SQUARE)
        else:
            for n, part in enumerate(_BREAK.split(token)):
                if n:
                    runs.append(Run(BREAK, -1.0))
                runs.append(Run(part, 1.0))
    for start in rounds:
        multiply(start, ROUND)
    for start in squares:
        multiply(start, SQUARE)
    if not runs:
        runs = [Run("", 1.0)]
    merged: list[Run] = [runs[0]]
    for run in runs[1:]:
        if run.weight == merged[-1].weight:
            merged[-1].text += run.text
        else:
            merged.append(run)
    return [(r.text, r.weight) for r in merged]


# --- 75-token chunks -----------------------------------------------------------------------------------

CHUNK_TOKENS = 75  # CLIP's 77 positions less the start and end tokens
COMMA_BACKTRACK = 20  # A1111's default "comma padding backtrack" setting


@dataclass
class Chunk:
    """One 77-token window: token ids with start/end, a multiplier per position, and where the vectors of
    a textual-inversion embedding replace placeholder tokens (position -> embedding name)."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    embeddings: dict[int, str] = field(default_factory=dict)


def build_chunks(runs: Sequence[tuple[str, float]], tokenize: Callable[[str], list[int]], *, start: int, end: int,
                 comma: int | None, find_embedding: Callable[[list[int], int], tuple[str, int, int] | None] =
                 lambda tokens, i: None, placeholder: int = 0, chunk_tokens: int = CHUNK_TOKENS,
                 backtrack: int = COMMA_BACKTRACK) -> list[Chunk]:
    """A1111's ``tokenize_line``: runs -> 77-token chunks (start + 75 + end, padded with ``end``).

    A chunk that fills up moves its words after the last comma within ``backtrack`` tokens into the
    next chunk, so a phrase is not cut in two; BREAK closes the chunk at once. ``find_embedding(tokens,
    i)`` -> (name, tokens its name spans, vectors) when an embedding's name starts at token i; its vectors
    stay together in one chunk, as ``placeholder`` tokens that the encoder replaces."""
    chunks: list[Chunk] = []
    chunk = Chunk()
    last_comma = -1

    def close() -> None:
        nonlocal chunk, last_comma
        pad = chunk_tokens - len(chunk.tokens)
        chunk.tokens = [start, *chunk.tokens, *[end] * pad, end]
        chunk.weights = [1.0, *chunk.weights, *[1.0] * pad, 1.0]
        chunk.embeddings = {p + 1: name for p, name in chunk.embeddings.items()}
        chunks.append(chunk)
        chunk, last_comma = Chunk(), -1

    for text, weight in runs:
        if text == BREAK and weight == -1:
            close()
            continue
        tokens = tokenize(text)
        i = 0
        while i < len(tokens):
            token = tokens[i]
            if token == comma:
                last_comma = len(chunk.tokens)
            elif (backtrack and len(chunk.tokens) == chunk_tokens and last_comma != -1
                  and len(chunk.tokens) - last_comma <= backtrack):
                cut = last_comma + 1
                moved = (chunk.tokens[cut:], chunk.weights[cut:],
                         {p - cut: n for p, n in chunk.embeddings.items() if p >= cut})
                chunk.tokens, chunk.weights = chunk.tokens[:cut], chunk.weights[:cut]
                chunk.embeddings = {p: n for p, n in chunk.embeddings.items() if p < cut}
                close()
                chunk.tokens, chunk.weights, chunk.embeddings = list(moved[0]), list(moved[1]), moved[2]
            if len(chunk.tokens) == chunk_tokens:
                close()
            found = find_embedding(tokens, i)
            if found is None:
                chunk.tokens.append(token)
                chunk.weights.append(weight)
                i += 1
                continue
            name, spanned, vectors = found
            if len(chunk.tokens) + vectors > chunk_tokens:
                close()
            chunk.embeddings[len(chunk.tokens)] = name
            chunk.tokens += [placeholder] * vectors
            chunk.weights += [weight] * vectors
            i += spanned
    if chunk.tokens or not chunks:
        close()
    return chunks
