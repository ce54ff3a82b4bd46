"""AUTOMATIC1111's prompt syntax: each rule against values worked out by hand (and A1111's own examples)."""

import pytest

from imprompt.generation.prompt_syntax import (
    build_chunks,
    extract_networks,
    parse_emphasis,
    prompt_schedule,
    text_at_step,
)


@pytest.mark.parametrize("text, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    # A1111's docstring example: the last "(((sky)))" closes two of its brackets, the third runs to the end.
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),
    ("[x]", [("x", 1 / 1.1)]),
    ("[[x]]", [("x", 1 / 1.1 / 1.1)]),
    ("(x:0.5) y", [("x", 0.5), (" y", 1.0)]),
    ("( x : 1.25 )", [(" x ", 1.25)]),
    ("x:1.3)", [("x", 1.0), (":1.3)", 1.0)]),  # a weight with no open bracket is text (merged below)
    ("stray ) closer ]", [("stray ) closer ]", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("aBREAKb", [("aBREAKb", 1.0)]),  # only the whole word
    ("", [("", 1.0)]),
])
def test_emphasis(text, expected):
    runs = parse_emphasis(text)
    merged = []
    for t, w in expected:  # neighbours of equal weight merge, as A1111's do
        if merged and merged[-1][1] == w:
            merged[-1] = (merged[-1][0] + t, w)
        else:
            merged.append((t, w))
    assert [t for t, _ in runs] == [t for t, _ in merged]
    assert [w for _, w in runs] == pytest.approx([w for _, w in merged], rel=1e-12)


@pytest.mark.parametrize("text, steps, expected", [
    ("a [b:c:0.5] d", 10, [(5, "a b d"), (10, "a c d")]),
    ("a [b:c:3] d", 10, [(3, "a b d"), (10, "a c d")]),  # no decimal point: a step number
    ("[b:c:1.0]", 10, [(10, "b")]),  # a fraction of 1: the whole run
    ("[b:c:0.05]", 10, [(10, "c")]),  # int(0.5) = 0: switches before the first step
    ("[b:c:25]", 10, [(10, "b")]),  # capped at the run's length
    ("[to:4]", 10, [(4, ""), (10, "to")]),
    ("[from::4]", 10, [(4, "from"), (10, "")]),
    ("[a: 5 ]", 10, [(5, ""), (10, "a")]),
    ("[a|b]", 4, [(1, "a"), (2, "b"), (3, "a"), (4, "b")]),
    ("[a|b|]", 3, [(1, "a"), (2, "b"), (3, "")]),
    ("x [[b:c:2]:d:4]", 6, [(2, "x b"), (4, "x c"), (6, "x d")]),
    ("[(red:1.2):blue:3]", 6, [(3, "(red:1.2)"), (6, "blue")]),  # emphasis inside stays text for the next stage
    ("[a:b:3] (x:y:z)", 6, [(3, "a (x:y:z)"), (6, "b (x:y:z)")]),  # a bad group does not spoil a good one
    ("[a:b]", 6, [(6, "[a:b]")]),  # no number: not an edit
    ("a|b", 6, [(6, "a|b")]),  # "|" outside brackets: the grammar rejects the text, used as is
    ("plain", 6, [(6, "plain")]),
])
def test_prompt_editing(text, steps, expected):
    assert prompt_schedule(text, steps) == expected


def test_step_rule_is_a1111s():
    # 0-based step t uses the first entry ending at or after t, so steps 0 and 1 share the first text.
    schedule = prompt_schedule("[a|b]", 4)
    assert [text_at_step(schedule, t) for t in range(4)] == ["a", "a", "b", "a"]
    schedule = prompt_schedule("[a:b:2]", 4)
    assert [text_at_step(schedule, t) for t in range(4)] == ["a", "a", "a", "b"]


def test_lora_tags():
    text, tags = extract_networks("a cat <lora:style_a:0.7>, <lora:b:0.3:0.9> <lora:c:te=0.2> <lora:d:unet=0.4> "
                                  "<lyco:e> <LORA:f:1:2:dyn>")
    assert text == "a cat ,     "
    assert [(t.name, t.te, t.unet) for t in tags] == [
        ("style_a", 0.7, 0.7), ("b", 0.3, 0.9), ("c", 0.2, 0.2), ("d", 1.0, 0.4), ("e", 1.0, 1.0), ("f", 1.0, 2.0)]
    with pytest.raises(ValueError, match="multiplier must be a number"):
        extract_networks("<lora:x:strong>")
    with pytest.raises(ValueError, match="not 'hypernet' networks"):
        extract_networks("<hypernet:x:1>")
    with pytest.raises(ValueError, match="finite"):
        extract_networks("<lora:x:nan>")


def words(text: str) -> list[int]:
    """A toy tokenizer: one token per space-separated word, ',' its own token (id 1), words by length."""
    out = []
    for word in text.replace(",", " , ").split():
        out.append(1 if word == "," else 100 + len(word))
    return out


def chunks(text, **kw):
    return build_chunks(parse_emphasis(text), words, start=-1, end=-2, comma=1, chunk_tokens=kw.pop("n", 6), **kw)


def test_chunks_pad_and_split():
    (one,) = chunks("aa (bbb:2)")
    assert one.tokens == [-1, 102, 103, -2, -2, -2, -2, -2]
    assert one.weights == [1, 1, 2, 1, 1, 1, 1, 1]
    first, second = chunks("a a a a a a a", backtrack=0)  # 7 words into 6-token chunks
    assert first.tokens == [-1, *[101] * 6, -2] and second.tokens == [-1, 101, *[-2] * 5, -2]
    a, b = chunks("x BREAK y")
    assert a.tokens[:3] == [-1, 101, -2] and b.tokens[:3] == [-1, 101, -2]


def test_chunks_move_the_words_after_the_last_comma():
    # 6 tokens "a a a , b b" fill the chunk; the next word pulls "b b" (2 tokens after the comma) along.
    first, second = chunks("a a a, b b c")
    assert first.tokens == [-1, 101, 101, 101, 1, -2, -2, -2]
    assert second.tokens == [-1, 101, 101, 101, -2, -2, -2, -2]
    first, second = chunks("a a a, b b c", backtrack=1)  # 2 > 1: no backtracking
    assert first.tokens == [-1, 101, 101, 101, 1, 101, 101, -2]


def test_embedding_vectors_stay_in_one_chunk():
    def toks(text):  # "emb" is one token (199); its embedding has 3 vectors
        return [199 if w == "emb" else 100 + len(w) for w in text.split()]

    def find(tokens, i):
        return ("emb", 1, 3) if tokens[i] == 199 else None

    first, second = build_chunks(parse_emphasis("a a a a (emb:1.5)"), toks, start=-1, end=-2, comma=None,
                                 find_embedding=find, placeholder=0, chunk_tokens=6)
    assert first.tokens == [-1, 101, 101, 101, 101, -2, -2, -2] and first.embeddings == {}
    assert second.tokens == [-1, 0, 0, 0, -2, -2, -2, -2] and second.embeddings == {1: "emb"}
    assert second.weights[1:4] == [1.5, 1.5, 1.5]
