"""The code-augmented step format of rStar-Math (spec section 1).

A trajectory is `<code>` + steps (python whose first lines are `#` comments,
each ending with `<end_of_step>`; the last code step ends with `<end_of_code>`),
then the system-appended `<output>...<end_of_output>`, then an `<answer>` step
ending with `<end_of_answer>` that carries `\\boxed{...}`.

Everything here is pure string handling: no model, no execution.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

END_OF_STEP = "<end_of_step>"
END_OF_CODE = "<end_of_code>"
END_OF_ANSWER = "<end_of_answer>"
STOP_STRINGS = (END_OF_STEP, END_OF_CODE, END_OF_ANSWER)
CODE_START = "<code>"
OUTPUT_START = "<output>"
# What generation stops at: the spec's three markers, plus `<output>`, which only the
# system may write (a model that starts writing its own output is stopped there, and the
# step is taken as closing the code block, see `normalize_candidate`).
GENERATION_STOPS = STOP_STRINGS + (OUTPUT_START,)
OUTPUT_END = "<end_of_output>"
ANSWER_START = "<answer>"
SPECIAL_TOKENS = (CODE_START, END_OF_STEP, END_OF_CODE, OUTPUT_START, OUTPUT_END, ANSWER_START, END_OF_ANSWER)

INSTRUCTION = "Let's think step by step and solve the problem with code."

# Two worked examples in the spec's format: an untrained model imitates them.
FEW_SHOT = [
    (
        "Tom has 3 boxes with 12 apples each. He gives away 10 apples. How many apples does he have left?",
        [
            "<code>\n# Step 1: Count the apples in all boxes.\ntotal = 3 * 12\n<end_of_step>",
            "\n# Step 2: Subtract the apples he gives away.\nleft = total - 10\n<end_of_step>",
            "\n# Now print the final answer\nprint(left)\n<end_of_code>",
            "\n<output>26<end_of_output>",
            "\n<answer>From the result, the answer is \\boxed{26}.<end_of_answer>",
        ],
    ),
    (
        "What is the value of x if 2x + 6 = 20?",
        [
            "<code>\n# Step 1: Move 6 to the other side: 2x = 20 - 6.\nrhs = 20 - 6\n<end_of_step>",
            "\n# Step 2: Divide both sides by 2.\nx = rhs / 2\n<end_of_step>",
            "\n# Now print the final answer\nprint(x)\n<end_of_code>",
            "\n<output>7.0<end_of_output>",
            "\n<answer>From the result, the answer is \\boxed{7}.<end_of_answer>",
        ],
    ),
]


def question_prompt(question: str) -> str:
    return f"<|user|>:\n{question}\n\n<|assistant|>: {INSTRUCTION}\n"


def render_prompt(question: str, steps: list[str] | tuple[str, ...], few_shot: bool = True) -> str:
    """The model input for a prefix: (few-shot examples +) question + steps so far.

    The first step is primed with `<code>\\n` when no step exists yet, so the
    model starts writing python right away.
    """
    parts: list[str] = []
    if few_shot:
        for q, ex_steps in FEW_SHOT:
            parts.append(question_prompt(q) + "".join(ex_steps) + "\n\n")
    parts.append(question_prompt(question))
    body = "".join(steps)
    if not steps:
        body = CODE_START + "\n"
    elif not body.lstrip().startswith(CODE_START) and not _has_answer_marker(body):
        body = CODE_START + "\n" + body
    parts.append(body)
    return "".join(parts)


def _has_answer_marker(text: str) -> bool:
    return ANSWER_START in text or "\\boxed" in text


def normalize_candidate(text: str, is_first: bool) -> str:
    """Canonical step text: the first step always opens the `<code>` block, and a step in
    which the model writes `<output>` itself is cut there and closes the code block (the
    system runs the program and appends the real output)."""
    pos = text.find(OUTPUT_START)
    if pos >= 0 and "\\boxed" not in text[:pos] and ANSWER_START not in text[:pos]:
        text = text[:pos].rstrip() + "\n" + END_OF_CODE
    if is_first and not text.lstrip().startswith(CODE_START) and not _has_answer_marker(text):
        return CODE_START + "\n" + text.lstrip("\n")
    return text


@dataclass(frozen=True)
class ParsedStep:
    text: str
    code: str           # python of this step ("" for an answer step)
    ends_code: bool     # the step closes the <code> block (program must run, output appended)
    is_answer: bool     # the step carries \boxed{} (terminal)
    answer: str | None  # content of the last \boxed{}
    complete: bool      # ended with one of the stop strings


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (balanced braces), or None."""
    idx = text.rfind("\\boxed")
    while idx >= 0:
        j = idx + len("\\boxed")
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            depth = 0
            for k in range(j, len(text)):
                if text[k] == "{":
                    depth += 1
                elif text[k] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[j + 1:k].strip()
            return None
        idx = text.rfind("\\boxed", 0, idx)
    return None


_MARKERS = re.compile("|".join(re.escape(m) for m in SPECIAL_TOKENS))


def step_code(text: str) -> str:
    """The python of one step: the text with markers removed, cut at any `<output>`/`<answer>`."""
    for cut in (OUTPUT_START, ANSWER_START):
        pos = text.find(cut)
        if pos >= 0:
            text = text[:pos]
    return _MARKERS.sub("", text).strip("\n")


def parse_step(text: str) -> ParsedStep:
    answer = extract_boxed(text)
    complete = any(text.rstrip().endswith(s) for s in STOP_STRINGS)
    is_answer = answer is not None
    # spec: a step containing \boxed{} is terminal; its code is not run
    code = "" if is_answer else step_code(text)
    ends_code = END_OF_CODE in text
    return ParsedStep(text=text, code=code, ends_code=ends_code, is_answer=is_answer, answer=answer,
                      complete=complete)


def current_code_block(steps: list[str] | tuple[str, ...]) -> list[str]:
    """Steps of the open `<code>` block: everything after the last output/answer step."""
    block: list[str] = []
    for s in steps:
        if OUTPUT_START in s or ANSWER_START in s:
            block = []
            continue
        if CODE_START in s:
            block = []
        block.append(s)
    return block


def assemble_program(steps: list[str] | tuple[str, ...], new_step: str) -> str:
    """The program that verifies `new_step`: all code steps of its block, re-run from the start."""
    codes = [step_code(s) for s in current_code_block(list(steps)) + [new_step]]
    return "\n".join(c for c in codes if c.strip()) + "\n"


def output_step(stdout: str) -> str:
    """The system-written step appended after a step that ends the code block."""
    return f"\n{OUTPUT_START}{stdout.strip()}{OUTPUT_END}"


def output_is_failure(stdout: str) -> bool:
    """Spec: a step whose output mentions "error" counts as failed."""
    return "error" in stdout.lower()


def max_prompt_chars() -> int:
    return len(render_prompt("", [], few_shot=True))
