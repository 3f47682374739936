"""The teacher-reply parser: every format variation real models produce, and every reason a reply is rejected."""

from __future__ import annotations

import pytest

from lora_llava.datagen.parse import Reject, parse_description, parse_pairs

TWO = [("What is on the table?", "A red cube."), ("How many cubes are there?", "There is one cube.")]


@pytest.mark.parametrize("reply", [
    # the asked-for format
    "Question:\nWhat is on the table?\n===\nAnswer:\nA red cube.\n===\nQuestion:\nHow many cubes are there?\n===\n"
    "Answer:\nThere is one cube.\n===",
    # text on the label's line, no final separator
    "Question: What is on the table?\n===\nAnswer: A red cube.\n===\nQuestion: How many cubes are there?\n===\n"
    "Answer: There is one cube.",
    # Q: / A: and no separators at all
    "Q: What is on the table?\nA: A red cube.\n\nQ: How many cubes are there?\nA: There is one cube.",
    # markdown bold labels, numbering, --- separators and a preamble
    "Sure! Here is the conversation:\n\n**Question 1:** What is on the table?\n**Answer 1:** A red cube.\n---\n"
    "**Question 2:** How many cubes are there?\n**Answer 2:** There is one cube.\n---",
    # numbered list items and headings
    "1. Question: What is on the table?\n   Answer: A red cube.\n2. Question: How many cubes are there?\n"
    "   Answer: There is one cube.",
    "### Question\uff1a What is on the table?\n### Answer: A red cube.\n### Question: How many cubes are there?\n"
    "### Answer: There is one cube.",
    # one line per pair with inline ===, CRLF line ends, inside a code fence
    "```\r\nQuestion: What is on the table? === Answer: A red cube. ===\r\nQuestion: How many cubes are there? === "
    "Answer: There is one cube. ===\r\n```",
    # lower-case labels, extra blank lines
    "question:\n\nWhat is on the table?\n\n===\n\nanswer:\n\nA red cube.\n\n===\n\nquestion:\nHow many cubes are "
    "there?\n===\nanswer:\nThere is one cube.\n",
])
def test_pairs_read_from_every_variation(reply):
    assert parse_pairs(reply) == TWO


def test_multi_line_answers_keep_their_paragraphs():
    reply = "Question:\nWhy?\n===\nAnswer:\nFirst, this.\n\nSecond, that.\n===\n"
    assert parse_pairs(reply, expect_one=True) == [("Why?", "First, this.\n\nSecond, that.")]


@pytest.mark.parametrize(("reply", "kwargs", "reason"), [
    ("", {}, "empty"),
    ("   \n ", {}, "empty"),
    ("The image shows a cube on a table.", {}, "no_labels"),
    ("Question:\nWhat?\n===\nQuestion:\nWhere?\n===\nAnswer:\nHere.", {}, "unpaired"),
    ("Answer:\nHere.\n===\nQuestion:\nWhere?", {}, "unpaired"),
    ("Question:\nWhat?\n===\nAnswer:\nThat.\n===\nQuestion:\nAnd then?", {}, "unpaired"),
    ("Question:\n\n===\nAnswer:\nThat.", {}, "empty_field"),
    ("Question:\nWhat?\n===\nAnswer:\n===", {}, "empty_field"),
    ("Question: A?\nAnswer: B.\nQuestion: C?\nAnswer: D.", {"expect_one": True}, "pair_count"),
    ("Question: A?\nAnswer: B", {"finish_reason": "length"}, "truncated"),
    ("I'm sorry, but I cannot help with that.", {}, "refusal"),
    ("Question: What is in <image>?\nAnswer: A cube.", {}, "image_tag"),
    ("Question: What?\nAnswer: A cube.</s>", {}, "special_token"),
    ("Question: What?\nAnswer: A <pad> cube.", {}, "special_token"),
])
def test_rejects_name_their_reason(reply, kwargs, reason):
    with pytest.raises(Reject) as e:
        parse_pairs(reply, **kwargs)
    assert e.value.reason == reason
    assert str(e.value)


def test_descriptions():
    assert parse_description("**Description:** A cube sits on a table.\n") == "A cube sits on a table."
    assert parse_description("```\nA cube.\n\nIt is red.\n```") == "A cube.\n\nIt is red."
    for reply, reason in [("", "empty"), ("Description:", "empty"),
                          ("A cube at [0.120, 0.300, 0.500, 0.800] on a table.", "mentions_input"),
                          ("According to the bounding boxes, a cube.", "mentions_input"),
                          ("Question: What?\nAnswer: A cube.", "format"),
                          ("A long text", "truncated")]:
        with pytest.raises(Reject) as e:
            parse_description(reply, finish_reason="length" if reason == "truncated" else "stop")
        assert e.value.reason == reason, reply
