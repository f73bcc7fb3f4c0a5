"""The free-text answer parser: reply shapes -> option index, or None (invalid, never a guess)."""

from __future__ import annotations

import pytest

from qa.parsing import NUMBERINGS, Numbering, parse_answer
from qa.prompts import get_template

OPTIONS = (
    "the man cuts onions",
    "the man washes dishes",
    "the woman reads a book",
    "the man cooks rice",
    "nobody is in the kitchen",
)
A, B, C, D, E = range(5)

# Default numbering: the prompt labelled the options A-E. (reply, expected index or None)
LETTER_CASES: list[tuple[str | None, int | None]] = [
    # empty replies
    (None, None),
    ("", None),
    ("   \n\t", None),
    # the whole reply is a letter, maybe wrapped; lowercase; trailing punctuation
    ("C", C),
    ("c", C),
    ("(C)", C),
    ("[D]", D),
    ("C.", C),
    ("C)", C),
    ("C!", C),
    ("(E).", E),
    ("'B'", B),
    ("Answer: C", C),
    ("answer: c", C),
    ("ANSWER: C", C),
    ("Answer:\nC", C),
    ("Option c", C),
    ("A", A),
    # explicit statements
    ("The answer is (C)", C),
    ("The answer is: c", C),
    ("the answer is e.", E),
    ("The answer is C because the woman is reading.", C),
    ("The best answer would be B", B),
    ("Final answer: D", D),
    ("The final answer (C).", C),
    ("Correct answer: C", C),
    ("My answer: D", D),
    ("answer = 'B'", B),
    ("Answer: B;", B),
    ("The correct option is C.", C),
    ("Based on the video, the correct choice would be (D).", D),
    ("I choose option C", C),
    ("I would choose C.", C),
    ("I'll go with E.", E),
    ("Option D is the correct answer.", D),
    ("After checking, (B) is correct.", B),
    ("Option A is not correct, C is correct.", C),
    ("Answer: A", A),
    ("The answer is A because the man holds a knife.", A),
    ("the answer is a.", A),
    # 1. an explicit statement beats a bare mention of another option
    ("The answer is (C), unlike option E which shows an empty kitchen.", C),
    ("Option E is tempting, but the correct answer is C.", C),
    ("A seems wrong. B too. Therefore, the answer is D.", D),
    ("The answer is C.\n\n**Explanation:** Option A is wrong because he never cuts.", C),
    ("The answer is B, not C.", B),
    # ... and beats the lower-priority rules (leading label, restated option text)
    ("A) seems plausible at first, but the answer is D", D),
    ("The answer is B. The woman reads a book.", B),
    ("The answer is C (the man cuts onions)", C),
    # 2. a later explicit statement beats an earlier one
    ("The answer is A. Wait, no: the answer is C.", C),
    ("Answer: B\n\nActually, on reflection, the correct option is D.", D),
    ("The answer is A or B. Final answer: B", B),
    ("Answer: C or D? Thinking again, I'd go with D.", D),
    ("Let's think step by step.\nThe man is at the sink.\nThe answer is (B)", B),
    # 3. JSON replies
    ('{"answer": "C"}', C),
    ('{"answer": "(C)"}', C),
    ('{"answer": "c."}', C),
    ('{"reason": "the woman has a book", "answer": "C"}', C),
    ('```json\n{"answer": "D", "reason": "at first I thought the answer is B"}\n```', D),
    ('{"reason": "Option A is wrong, so the answer is B", "answer": "E"}', E),
    ('Here is my reply: {"answer": "B", "confidence": 0.9}', B),
    ('{"answer": "the woman reads a book"}', C),
    ('{"answer": "C"} Actually the answer is D', D),  # text after the object corrects it
    ("{'answer': 'C'}", C),  # not JSON (single quotes), still an "answer:" statement
    ('{"answer": "A or B"}', None),
    ('{"answer": true}', None),
    ('{"answer": null}', None),
    ('{"answer": "C", "option": "D"}', None),  # two answer keys that disagree
    ('{"option": 2}', None),  # an index, but the prompt used letters: ambiguous
    ('{"answer": 2}', None),
    # 4. LaTeX \boxed
    (r"\boxed{C}", C),
    (r"$\boxed{\text{C}}$", C),
    (r"\boxed{(C)}", C),
    (r"The final answer is $\boxed{\textbf{D}}$.", D),
    (r"So \boxed{A}. Re-checking the sink scene: \boxed{D}", D),
    (r"\boxed{A \text{ or } C}", None),
    # 5. Markdown emphasis
    ("**C**", C),
    ("**Answer: E**", E),
    ("The answer is **(C)**", C),
    ("__C__", C),
    ("*C*", C),
    ("`B`", B),
    ("**Answer:** C", C),
    ("I pick **D** here.", D),
    ("**C**. The woman reads a book.", C),
    ("**Option A**: wrong. **Option C**: correct.", None),  # mentions, no statement
    # 6. bare numbers are ambiguous under letter labels
    ("Option 3", None),
    ("Choice: 5", None),
    ("The correct option is 4.", None),
    ("The answer is 3 (the woman reads a book)", None),  # the number decides, not the text
    ("Option 9", None),
    ("1. First the man enters the kitchen", None),  # a step list, not a label
    # 7. a statement naming two different letters is invalid, never the first of them
    ("the answer is A or C", None),
    ("Answer: B and D", None),
    ("either A or B", None),
    ("It is either B or D.", None),
    ("The answer is either B or D.", None),
    ("Answer: B/D", None),
    ("Answer: B, C", None),
    ("The answer is (C)(D)", None),
    ("A or B", None),
    ("(A) or (B)", None),
    ("Final answer: B. Hmm, the answer is B or D", None),  # the last statement is ambiguous
    # 8. the article "a"/"A" in prose is not option A
    ("A man picks up a knife.", None),
    ("Answer: A man picks up a knife", None),
    ("A woman walks into the kitchen.", None),
    ("the answer is a man cooking", None),
    ("e.g. the man is at the table", None),  # "e." is not option E either
    # hedged or negated statements are not statements
    ("Let's check whether B is correct.", None),
    ("If the answer is B, the man would be at the sink.", None),
    ("C is not the correct answer.", None),
    ("The answer is not A.", None),
    ("I cannot tell from the descriptions.", None),
    # 8. the reply starts with a letter label
    ("C) the woman reads a book", C),
    ("c. the woman reads", C),
    ("(B) because he is at the sink", B),
    ("D - the man cooks rice", D),
    ("B\nThe man is at the sink the whole time.", B),
    ("C) the man cuts onions", None),  # label and restated text disagree
    ("(A) is wrong.", None),  # a leading label the reply rejects
    ("C) no, he never picks up a book", None),
    ("A. the man cuts onions - no\nB. the man washes dishes - no\nC. reads - yes", None),
    # 8. the answer restated in words
    ("The woman reads a book.", C),
    ("the man washes dishes", B),
    ("I think the man is cooking rice here", D),  # close paraphrase
    ("the man cuts onions and then the man washes dishes", None),  # two options restated
]

# Options labelled with numbers in the prompt. (reply, numbering, expected)
NUMBER_CASES: list[tuple[str, Numbering, int | None]] = [
    ("Option 3", "one", C),
    ("Option 3", "zero", D),
    ("4", "one", D),
    ("4", "zero", E),
    ("(2)", "zero", C),
    ("The answer is 0", "zero", A),
    ("The answer is 0", "one", None),  # out of 1-5
    ("The answer is 5", "one", E),
    ("The answer is 5", "zero", None),  # out of 0-4
    ("the answer is (4)", "one", D),
    ("I choose option 0.", "zero", A),
    ("Option 2 is correct.", "zero", C),
    ('{"option": 2}', "zero", C),
    ('{"option": 2}', "one", B),
    ('{"answer": 2}', "one", B),
    ('{"answer": "2"}', "one", B),
    ('{"answer": 1, "reason": "he is at the sink"}', "zero", B),
    ('```json\n{"answer": 4}\n```', "one", D),
    ('{"answer": -1}', "zero", None),
    (r"\boxed{3}", "one", C),
    ("3) the woman reads a book", "one", C),
    ("3) the man cuts onions", "one", None),  # label and restated text disagree
    ("At 3 seconds the man cooks; the answer is 4", "one", D),  # "3 seconds" is a time
    ("The answer is option 2 or 3", "one", None),
    ("The answer is 2. No wait, the answer is 4.", "zero", E),
    ("1. First the man enters\n2. Then he cooks", "one", None),  # an enumerated list
    ("Answer: C", "zero", None),  # letters mean nothing under number labels
    ('{"answer": "C"}', "one", None),
    ("A man picks up a knife", "one", None),
    ("The woman reads a book.", "zero", C),  # restated text needs no labels
    # the three old shapes that read numbers under letter labels, in their own numbering
    ("Choice: 5", "one", E),
    ("The correct option is 4.", "one", D),
]


@pytest.mark.parametrize(("reply", "expected"), LETTER_CASES)
def test_letter_labels(reply: str | None, expected: int | None) -> None:
    assert parse_answer(reply, OPTIONS) == expected


@pytest.mark.parametrize(("reply", "numbering", "expected"), NUMBER_CASES)
def test_number_labels(reply: str, numbering: Numbering, expected: int | None) -> None:
    assert parse_answer(reply, OPTIONS, numbering=numbering) == expected


@pytest.mark.parametrize("numbering", NUMBERINGS)
def test_empty_reply_is_invalid_in_every_numbering(numbering: Numbering) -> None:
    assert parse_answer(None, OPTIONS, numbering=numbering) is None
    assert parse_answer(" ", OPTIONS, numbering=numbering) is None


def test_numbering_is_keyword_only_and_checked() -> None:
    with pytest.raises(TypeError):
        parse_answer("3", OPTIONS, "one")  # type: ignore[misc]
    with pytest.raises(ValueError, match="numbering must be one of letters, zero, one"):
        parse_answer("3", OPTIONS, numbering="two")  # type: ignore[arg-type]


def test_templates_still_call_the_parser_with_two_arguments() -> None:
    parser = get_template("cot").parser
    assert parser("Reasoning...\nThe answer is (B)", OPTIONS) == B
    assert parser("The answer is A or B", OPTIONS) is None
