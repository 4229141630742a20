"""The code-augmented step format of rStar-Math (spec section 1), and what a step means.

A trajectory is `<code>` + steps (python whose first lines are `#` comments,
each ending with `<end_of_step>`; the last code step ends with `<end_of_code>`),
then the system-appended `<output>...<end_of_output>`, then an `<answer>` step
ending with `<end_of_answer>` that carries `\\boxed{...}`.

`classify_candidate` is the one meaning of a generated step, used by the
search (`rstar.search.mcts.expand_leaf`), `rstar eval` and synthesis alike:

1. The model's text ends at its first stop string (`STOP_STRINGS`). Before
   that, it is cut at the first marker only the system may write
   (`<output>`, `<end_of_output>`, any chat-template token `<|...|>` such as
   `<|user|>`, `<|assistant|>`, `<|im_start|>` (a new chat turn), and
   `<answer>` outside an answer step; inside an answer step also `<code>` and
   a second `<answer>`). Nothing after the cut is kept, so text the model
   invents after a program line (its own "output", an answer, a next turn)
   never becomes an answer. A code step cut there closes the code block
   (`<end_of_code>` is appended): the system runs the program and appends the
   real output. An answer step cut there is closed with `<end_of_answer>`.
2. An *answer step* is a step that starts as one: its text (leading
   whitespace aside) starts with `<answer>`, or it has no code marker
   (`<code>`, `<end_of_step>`, `<end_of_code>`) and either carries `\\boxed`
   or ends with `<end_of_answer>`. Its answer is the content of its last
   `\\boxed{}`; an answer step without a complete `\\boxed{}` fails
   (`unboxed_answer`). Every other step is a *code step*; a code step that
   carries `\\boxed` or ends with `<end_of_answer>` fails (`answer_in_code`):
   an answer comes only from a well-formed answer step.
3. A step whose kept text reached the token limit (`finish_reason ==
   "length"`, not cut) fails (`length`), answer steps included: a cut-off
   answer is not well-formed. A code step with nothing but markers fails
   (`empty`); one that ended without a stop string and was not cut fails
   (`incomplete`). An answer step that ended without `<end_of_answer>` (end of
   sequence) is still an answer; `well_formed` is False for it.
4. The first step of a trajectory opens the `<code>` block (prepended when
   the model's code step does not start with it).

Program output enters prompts and trees only through `output_step`, which
escapes step markers and chat tokens (`escape_output`), so a program that
prints `<end_of_step>` or `<answer>\\boxed{5}` cannot forge steps, and keeps at
most `OUTPUT_PROMPT_BYTES` of it (`truncate_output`: head and tail, the cut
named), so a program that prints 64 KiB cannot fill the context of every later
prompt. The budget is in UTF-8 bytes, an upper bound on the tokens of any
byte-level tokenizer (every token is at least one byte). It is part of the
step format, not a service flag: the search, stored trees, SFT data and eval
must all rebuild the same prefix from the same output.

Everything here is pure string handling: no model, no execution, no grading
(`rstar.grading` decides whether an answer is right).
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
# What every policy stops generation at (vLLM service, local transformers policy, teacher
# endpoint): the spec's three markers, plus `<output>`, which only the system may write (a model
# that starts writing its own output is stopped there, and `classify_candidate` takes the step as
# closing the code block). Four strings: the most an OpenAI-compatible `stop` accepts. Other
# system-only markers are not stops; `classify_candidate` cuts a step at them.
GENERATION_STOPS = STOP_STRINGS + (OUTPUT_START,)
OUTPUT_END = "<end_of_output>"
ANSWER_START = "<answer>"
SPECIAL_TOKENS = (CODE_START, END_OF_STEP, END_OF_CODE, OUTPUT_START, OUTPUT_END, ANSWER_START, END_OF_ANSWER)
CODE_MARKERS = (CODE_START, END_OF_STEP, END_OF_CODE)
# A chat-template token (`<|user|>`, `<|assistant|>`, `<|im_start|>`, `<|endoftext|>`, ...): a
# model that writes one is inventing the next turn of the conversation.
CHAT_TOKEN = re.compile(r"<\|[A-Za-z0-9_\-]{1,40}\|>")

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


# Prompt styles: how the question and the worked examples are wrapped around the steps.
#   rstar   the paper's plain format (`<|user|>:` / `<|assistant|>:`), for models without a
#           chat template of their own (SmolLM2 here; the authors' policy models)
#   chatml  the `<|im_start|>role ... <|im_end|>` turns of Qwen's chat template, with a system
#           message that states the step format; an instruct model follows its own template better
PROMPT_STYLES = ("rstar", "chatml")
SYSTEM_PROMPT = (
    "You solve math problems by writing Python step by step. Each step starts with a `#` comment that "
    "explains it, then code, and ends with <end_of_step>; the last code step prints the result and ends "
    "with <end_of_code>. After the program's output, state the final answer as "
    "<answer>...\\boxed{answer}<end_of_answer>."
)


def question_prompt(question: str, style: str = "rstar") -> str:
    if style == "chatml":
        return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    return f"<|user|>:\n{question}\n\n<|assistant|>: {INSTRUCTION}\n"


def _example_end(style: str) -> str:
    return "<|im_end|>\n" if style == "chatml" else "\n\n"


def render_prompt(question: str, steps: list[str] | tuple[str, ...], few_shot: bool | int = True,
                  style: str = "rstar") -> str:
    """The model input for a prefix: (worked examples +) question + steps so far.

    `few_shot`: True = every example in `FEW_SHOT`, False/0 = none, N = the first N.
    The first step is primed with `<code>\\n` when no step exists yet, so the
    model starts writing python right away.
    """
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; known: {', '.join(PROMPT_STYLES)}")
    n_examples = len(FEW_SHOT) if few_shot is True else int(few_shot or 0)
    parts: list[str] = []
    if style == "chatml":
        parts.append(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n")
    for q, ex_steps in FEW_SHOT[:n_examples]:
        parts.append(question_prompt(q, style) + "".join(ex_steps) + _example_end(style))
    parts.append(question_prompt(question, style))
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
    """Canonical step text of a candidate (see `classify_candidate`)."""
    return classify_candidate(text, "stop", is_first).text


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


# --------------------------------------------------------------------------- one meaning of a step

ANSWER, CODE, ENDS_CODE, FAILURE = "answer", "code", "ends_code", "failure"


@dataclass(frozen=True)
class ClassifiedStep:
    """What a generated candidate means (rules in the module docstring)."""

    text: str                   # canonical step text: what enters the prefix, the tree and the program
    kind: str                   # ANSWER, CODE (the block stays open), ENDS_CODE (run it, output follows), FAILURE
    failure: str = ""           # for FAILURE: "length", "empty", "incomplete", "unboxed_answer", "answer_in_code"
    code: str = ""              # python of this step ("" for an answer step)
    ends_code: bool = False     # the text closes the <code> block
    answer: str | None = None   # content of the last \boxed{} of an answer step
    cut_at: str = ""            # the system-only marker the model's text was cut at ("" if none)
    well_formed: bool = False   # the model itself ended the step with a stop string (not cut, not cut off)

    @property
    def is_answer(self) -> bool:
        return self.kind == ANSWER

    @property
    def failed(self) -> bool:
        return self.kind == FAILURE


def _first_stop_end(text: str, start: int) -> int:
    """Index just past the first stop string at or after `start`, or -1."""
    ends = [pos + len(s) for s in STOP_STRINGS if (pos := text.find(s, start)) >= 0]
    return min(ends) if ends else -1


def _first_system_marker(text: str, start: int, answer_step: bool) -> tuple[int, str]:
    """(position, marker) of the first marker the model may not write here, or (-1, "")."""
    markers = (OUTPUT_START, OUTPUT_END, ANSWER_START) + ((CODE_START,) if answer_step else ())
    best_pos, best = -1, ""
    for m in markers:
        pos = text.find(m, start)
        if pos >= 0 and (best_pos < 0 or pos < best_pos):
            best_pos, best = pos, m
    chat = CHAT_TOKEN.search(text, start)
    if chat and (best_pos < 0 or chat.start() < best_pos):
        best_pos, best = chat.start(), chat.group(0)
    return best_pos, best


def classify_candidate(text: str, finish_reason: str = "stop", is_first: bool = False) -> ClassifiedStep:
    """The one classification of a policy candidate (search, eval and synthesis all use it).

    `finish_reason` is the policy's ("stop" or "length"); `is_first` says the step
    is the first of its trajectory (it must open the `<code>` block).
    """
    lead = len(text) - len(text.lstrip())
    answer_led = text.startswith(ANSWER_START, lead)
    start = lead + len(ANSWER_START) if answer_led else 0   # the leading <answer> is the model's own
    stop_end = _first_stop_end(text, start)
    cut_pos, cut_at = _first_system_marker(text, start, answer_led)
    if cut_pos >= 0 and (stop_end < 0 or cut_pos < stop_end):
        head = text[:cut_pos]
    else:
        # real policies end a candidate at its first stop string; anything a fake adds is dropped
        cut_at = ""
        head = text[:stop_end] if stop_end >= 0 else text
    cut = bool(cut_at)
    ended = head.rstrip().endswith(STOP_STRINGS)
    # the token limit matters only if the kept text ran into it (a cut drops what came after)
    cut_off = finish_reason == "length" and not cut
    well_formed = ended and not cut and not cut_off
    has_code_marker = any(m in head for m in CODE_MARKERS)
    claims_answer = "\\boxed" in head or head.rstrip().endswith(END_OF_ANSWER)

    if answer_led or (not has_code_marker and claims_answer):
        body = head.rstrip() + END_OF_ANSWER if cut else head
        if cut_off:
            return ClassifiedStep(body, FAILURE, "length", cut_at=cut_at)
        answer = extract_boxed(head)
        if answer is None:
            return ClassifiedStep(body, FAILURE, "unboxed_answer", cut_at=cut_at, well_formed=well_formed)
        return ClassifiedStep(body, ANSWER, answer=answer, cut_at=cut_at, well_formed=well_formed)

    code = step_code(head)
    body = head.rstrip() + "\n" + END_OF_CODE if cut and code.strip() else head
    if is_first and not body.lstrip().startswith(CODE_START):
        body = CODE_START + "\n" + body.lstrip("\n")
    ends_code = END_OF_CODE in body

    def failed(reason: str) -> ClassifiedStep:
        return ClassifiedStep(body, FAILURE, reason, code=code, ends_code=ends_code, cut_at=cut_at,
                              well_formed=well_formed)

    if cut_off:
        return failed("length")
    if not head.strip() or not (code.strip() or ends_code):
        return failed("empty")          # nothing but markers
    if claims_answer:
        return failed("answer_in_code")  # an answer outside a well-formed answer step
    if not ended and not cut:
        return failed("incomplete")     # ended without a stop string and without an answer
    return ClassifiedStep(body, ENDS_CODE if ends_code else CODE, code=code, ends_code=ends_code, cut_at=cut_at,
                          well_formed=well_formed)


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


_FORGEABLE = re.compile("|".join([re.escape(m) for m in SPECIAL_TOKENS] + [CHAT_TOKEN.pattern]))


def escape_output(stdout: str) -> str:
    """Program output with step markers and chat tokens defused (`<end_of_step>` becomes
    `&lt;end_of_step>`), so printed text cannot forge a step or a turn. Idempotent."""
    return _FORGEABLE.sub(lambda m: "&lt;" + m.group(0)[1:], stdout)


# The most program output a prompt carries after one code block: 1 KiB is a few hundred tokens
# (a 4,096-token context also holds the few-shot examples, the problem and up to 16 steps), far
# more than the numbers a solution step prints; a step's full output stays in its tree node.
OUTPUT_PROMPT_BYTES = 1024
_CUT_NOTE = "\n... [{n} bytes of output cut] ...\n"


def truncate_output(text: str, max_bytes: int = OUTPUT_PROMPT_BYTES) -> str:
    """`text` if its UTF-8 encoding fits `max_bytes`, else its head and tail with the cut named
    in between, the whole within `max_bytes` (the tail gets a quarter: a program's last lines
    usually hold its result). Never splits a character; never creates a `<` (safe after
    `escape_output`). Idempotent."""
    raw = text.encode("utf-8")
    if len(raw) <= max_bytes:
        return text
    note_len = len(_CUT_NOTE.format(n=len(raw)).encode())
    keep = max(0, max_bytes - note_len)
    tail_len = keep // 4
    head = raw[:keep - tail_len].decode("utf-8", errors="ignore")
    tail = raw[len(raw) - tail_len:].decode("utf-8", errors="ignore") if tail_len else ""
    cut = len(raw) - len(head.encode()) - len(tail.encode())
    return head + _CUT_NOTE.format(n=cut) + tail


def output_step(stdout: str, max_bytes: int = OUTPUT_PROMPT_BYTES) -> str:
    """The system-written step appended after a step that ends the code block (output escaped,
    then cut to `max_bytes`: `truncate_output`)."""
    return f"\n{OUTPUT_START}{truncate_output(escape_output(stdout.strip()), max_bytes)}{OUTPUT_END}"


def output_is_failure(stdout: str) -> bool:
    """Spec: a step whose output mentions "error" counts as failed."""
    return "error" in stdout.lower()


def max_prompt_chars() -> int:
    return max(len(render_prompt("", [], few_shot=True, style=st)) for st in PROMPT_STYLES)


def steps_added(text: str, output: str, *, ends_code: bool, failed: bool, is_answer: bool) -> tuple[str, ...]:
    """What one step adds to the prefix its successors see (the prefix rule, defined once).

    Its own text; after a step that closes the code block and ran cleanly, also the
    system-written output step. A failed step or an answer step adds only its text.
    Used by the search tree (`rstar.search.mcts.Node`) and the stored tree records
    (`rstar.trees.NodeRecord`), so a stored prefix is exactly what the models saw.
    """
    if ends_code and not failed and not is_answer:
        return (text, output_step(output))
    return (text,)
