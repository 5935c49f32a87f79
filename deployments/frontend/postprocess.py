"""Turning the one-shot heads' numbers into answers: labels, entity groups, the QA span.

`group_entities` follows transformers' TokenClassificationPipeline with aggregation_strategy
"simple"; `best_span` is the extractive-QA search (start <= end < start + max_len, maximizing
p_start * p_end with softmax over the context positions).
"""

from __future__ import annotations

import math

from deployments.frontend.results import Answer, Entity, TokenLabel

ANSWER_MAX_SPAN_TOKENS = 30


def top_label(id2label: dict[int, str], probs: list[float]) -> tuple[str, float]:
    """The most probable label of a probability row, and its probability."""
    best = max(range(len(probs)), key=probs.__getitem__)
    return id2label.get(best, f"LABEL_{best}"), float(probs[best])


def _split_tag(label: str) -> tuple[str, str]:
    # HF's TokenClassificationPipeline.get_tag: "B-X" / "I-X" -> (bi, X); a bare label is an I-.
    if label.startswith("B-") or label.startswith("I-"):
        return label[0], label[2:]
    return "I", label


def group_entities(tokens: list[TokenLabel], text: str) -> list[Entity]:
    """HF pipeline's aggregation_strategy="simple": B-/I- runs of one type -> entities; "O" dropped."""
    groups: list[list[TokenLabel]] = []
    tags: list[str] = []
    for tok in tokens:
        bi, tag = _split_tag(tok.label)
        if groups and bi != "B" and tag == tags[-1]:
            groups[-1].append(tok)
        else:
            groups.append([tok])
            tags.append(tag)
    out = []
    for group, tag in zip(groups, tags):
        if tag == "O" or group[0].label == "O":
            continue
        start, end = group[0].start, group[-1].end
        out.append(Entity(entity_group=tag, score=sum(t.score for t in group) / len(group),
                          word=text[start:end].strip(), start=start, end=end))
    return out


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    ex = [math.exp(x - m) for x in xs]
    z = sum(ex)
    return [x / z for x in ex]


def best_span(start_logits: list[float], end_logits: list[float], offsets: list[tuple[int, int]], context: str,
              max_len: int = ANSWER_MAX_SPAN_TOKENS) -> Answer:
    """The span start <= end < start + max_len maximizing p_start * p_end (softmax over the context)."""
    ps, pe = _softmax(start_logits), _softmax(end_logits)
    best, bi, bj = -1.0, 0, 0
    for i in range(len(ps)):
        for j in range(i, min(len(pe), i + max_len)):
            score = ps[i] * pe[j]
            if score > best:
                best, bi, bj = score, i, j
    start, end = offsets[bi][0], offsets[bj][1]
    return Answer(answer=context[start:end], score=float(best), start=int(start), end=int(end))
