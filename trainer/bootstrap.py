"""Round-1 bootstraps (issue 6 item 6): GSM8K reference conversion, and a teacher endpoint.

(a) `convert_solution`: a GSM8K reference solution carries calculator notes
    (`48/2 = <<48/2=24>>24`). Each line with a note becomes one code step: the
    line, notes removed, as the `# Step i:` comment, and `v_i = <expression>`
    as code, where a literal equal to an earlier result is replaced by that
    result's variable (so the code chains the way the reasoning does). Lines
    without a note are folded into the next step's comment. The last code step
    prints the variable holding the gold answer; then the output and the
    `\\boxed{}` answer step follow, exactly as `rstar.steps.FEW_SHOT` shows.
    `verify_conversions` runs every program in the sandbox (the same isolated
    runner the search uses) and keeps a trajectory only if the run succeeds,
    prints nothing that looks like an error, and its output grades equal to the
    gold answer. Verified trajectories are written as ordinary synthesis trees
    (a chain per problem, Q = +1, terminal-guided "reference" annotation) so the
    rest of the pipeline (SFT selection, dedup, manifests) treats them like any
    synthesis shard.

(b) `TeacherPolicy`: any OpenAI-compatible `/v1/completions` server (for
    example a large model served by vLLM) as the round-1 policy; it implements
    the search engine's `Policy` protocol, so synthesis runs MCTS with it. Each
    request has a timeout and is retried with exponential backoff on
    connection errors, 429 and 5xx.
"""

from __future__ import annotations

import json
import logging
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from rstar import grading, steps as stepfmt
from rstar.trees import NodeRecord, TreeRecord

log = logging.getLogger(__name__)

_NOTE = re.compile(r"<<([^<>]*)>>")
_NUM = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?![\w.])")
_SAFE_EXPR = re.compile(r"^[\d\s+\-*/().%]+$")


@dataclass(frozen=True)
class Conversion:
    problem_id: str
    question: str
    gold: str
    steps: tuple[str, ...]     # code steps (the last ends with <end_of_code>)
    program: str               # what the sandbox runs to verify

    def trajectory(self, output: str) -> tuple[str, ...]:
        """The full trajectory once the program's output is known."""
        return self.steps + (stepfmt.output_step(output), answer_step(_clean_number(output)))


def answer_step(answer: str) -> str:
    return f"\n{stepfmt.ANSWER_START}From the result, the answer is \\boxed{{{answer}}}.{stepfmt.END_OF_ANSWER}"


def _clean_number(text: str) -> str:
    s = text.strip().splitlines()[-1].strip() if text.strip() else ""
    try:
        v = float(s)
    except ValueError:
        return s
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.6g}"


def _same_value(a: str, b: str) -> bool:
    try:
        return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b)))
    except ValueError:
        return False


def convert_solution(problem_id: str, question: str, solution: str, gold: str) -> Conversion | None:
    """A code-step trajectory from a GSM8K reference solution, or None if it cannot be converted."""
    body = solution.split("####")[0]
    lines = [ln.strip() for ln in body.strip().splitlines() if ln.strip()]
    pending_comment: list[str] = []
    code_steps: list[tuple[str, str]] = []     # (comment, code)
    results: list[tuple[str, str]] = []        # (variable, value as written)
    for line in lines:
        notes = _NOTE.findall(line)
        comment = re.sub(r"\s+", " ", _NOTE.sub("", line)).strip()
        if not notes:
            pending_comment.append(comment)
            continue
        code_lines = []
        for note in notes:
            if note.count("=") != 1:
                return None
            expr, value = (s.strip() for s in note.split("="))
            if not _SAFE_EXPR.match(expr) or not value:
                return None
            # an operand equal to an earlier result becomes that result's variable (latest first)
            def sub(m: re.Match) -> str:
                for var, val in reversed(results):
                    if _same_value(m.group(1), val):
                        return var
                return m.group(1)

            var = f"v{len(results) + 1}"
            code_lines.append(f"{var} = {_NUM.sub(sub, expr)}")
            results.append((var, value))
        code_steps.append((" ".join(pending_comment + [comment]), "\n".join(code_lines)))
        pending_comment = []
    if not code_steps:
        return None
    final_var = next((var for var, val in reversed(results) if _same_value(val, gold)), None)
    if final_var is None:
        return None
    steps_out = []
    for i, (comment, code) in enumerate(code_steps, 1):
        comment = comment.replace("\n", " ")
        text = f"\n# Step {i}: {comment}\n{code}\n{stepfmt.END_OF_STEP}"
        steps_out.append(text)
    steps_out[0] = stepfmt.CODE_START + steps_out[0]
    steps_out.append(f"\n# Now print the final answer\nprint({final_var})\n{stepfmt.END_OF_CODE}")
    # the steps must mean to the search what they mean here (a solution line quoting a marker or a
    # \boxed{} would not): classify them as a policy's candidates, keep only clean code steps
    for i, text in enumerate(steps_out):
        step = stepfmt.classify_candidate(text, "stop", is_first=i == 0)
        if step.kind not in (stepfmt.CODE, stepfmt.ENDS_CODE) or step.text != text or not step.well_formed:
            return None
    program = stepfmt.assemble_program(steps_out[:-1], steps_out[-1])
    return Conversion(problem_id, question, str(gold), tuple(steps_out), program)


@dataclass
class BootstrapStats:
    problems: int = 0
    converted: int = 0
    verified: int = 0
    failed_execution: int = 0
    wrong_output: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)

    def line(self) -> str:
        return (f"GSM8K bootstrap: {self.problems} problems, {self.converted} converted, {self.verified} verified "
                f"({self.failed_execution} failed to run, {self.wrong_output} wrong output)")


def verify_conversions(convs: Sequence[Conversion], executor, batch: int = 64
                       ) -> tuple[list[tuple[Conversion, str]], BootstrapStats]:
    """Run each conversion's program with `executor` (the search `Executor` protocol); keep the correct ones."""
    stats = BootstrapStats(converted=len(convs))
    ok: list[tuple[Conversion, str]] = []
    for b in range(0, len(convs), batch):
        chunk = convs[b:b + batch]
        results = executor.execute([c.program for c in chunk])
        for c, r in zip(chunk, results):
            if r.failure != "ok" or stepfmt.output_is_failure(r.stdout):
                stats.failed_execution += 1
                continue
            if not grading.answers_equal(_clean_number(r.stdout), c.gold):
                stats.wrong_output += 1
                continue
            ok.append((c, r.stdout.strip()))
    stats.verified = len(ok)
    return ok, stats


def chain_tree(conv: Conversion, output: str, round_no: int) -> TreeRecord:
    """A verified trajectory as a tree record (`rstar.trees`): root -> steps -> correct answer."""
    steps = [s for s in conv.trajectory(output) if not s.lstrip().startswith(stepfmt.OUTPUT_START)]
    nodes = [NodeRecord(id=0, parent=None, visits=1, value_sum=1.0, q=1.0)]
    for i, text in enumerate(steps, 1):
        parsed = stepfmt.parse_step(text)
        nodes.append(NodeRecord(
            id=i, parent=i - 1, depth=i, text=text, code=parsed.code, ends_code=parsed.ends_code,
            output=output if parsed.ends_code else "", visits=1, value_sum=1.0, q=1.0, terminal=parsed.is_answer,
            answer=parsed.answer, correct=True if parsed.is_answer else None))
        nodes[i - 1].children = [i]
    return TreeRecord(question=conv.question, nodes=nodes, problem_id=conv.problem_id, gold=conv.gold, seed=0,
                      settings={"annotation": "reference", "rollouts": 1, "k": 1}, rollouts_done=1, solved=True,
                      model_versions={"policy": "gsm8k-reference"}, extra={"round": round_no})


def convert_pool(rows: Iterable[dict[str, Any]]) -> tuple[list[Conversion], int]:
    """Conversions of every row with a `solution`; returns (conversions, rows seen)."""
    out, n = [], 0
    for r in rows:
        n += 1
        if not r.get("solution"):
            continue
        c = convert_solution(str(r["id"]), r["problem"], r["solution"], str(r["answer"]))
        if c is not None:
            out.append(c)
    return out, n


# --------------------------------------------------------------------------- teacher endpoint


class TeacherError(RuntimeError):
    """The teacher endpoint failed (after retries) or answered something unusable."""


class TeacherPolicy:
    """An OpenAI-compatible completion server as the search engine's `Policy`.

    One `/v1/completions` request per item (n = candidates, the item's seed),
    stop strings = `rstar.steps.GENERATION_STOPS`, the set every policy uses (kept in
    the text, as the policy service does). `few_shot` adds the two worked examples (an instruct model not
    trained on the format needs them).
    """

    def __init__(self, base_url: str, model: str, api_key: str = "", timeout: float = 120.0, retries: int = 4,
                 backoff: float = 0.5, few_shot: bool = True):
        self.url = base_url.rstrip("/")
        if not self.url.endswith("/v1"):
            self.url += "/v1"
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.retries = max(1, retries)
        self.backoff = backoff
        self.few_shot = few_shot
        self.version = f"teacher:{model}"

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last: Exception | None = None
        for attempt in range(self.retries):
            req = urllib.request.Request(self.url + path, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                if e.code != 429 and e.code < 500:
                    raise TeacherError(f"teacher {self.url}{path}: HTTP {e.code}: {detail}") from e
                last = TeacherError(f"HTTP {e.code}: {detail}")
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = e
            except ValueError as e:
                raise TeacherError(f"teacher {self.url}{path}: response is not JSON: {e}") from e
            if attempt + 1 < self.retries:
                delay = self.backoff * 2 ** attempt
                log.warning("teacher call failed (%s); retry %d/%d in %.1fs", last, attempt + 1, self.retries - 1, delay)
                time.sleep(delay)
        raise TeacherError(f"teacher {self.url}{path} failed after {self.retries} attempts: {last}")

    def generate(self, items, params, scope=None):
        from rstar.protocols import Candidate, Versioned

        out = []
        for item in items:
            prompt = stepfmt.render_prompt(item.question, list(item.steps), few_shot=self.few_shot)
            payload = {"model": self.model, "prompt": prompt, "n": item.n, "max_tokens": params.max_tokens,
                       "temperature": params.temperature, "top_p": params.top_p, "seed": int(item.seed & 0x7FFFFFFF),
                       "stop": list(stepfmt.GENERATION_STOPS), "include_stop_str_in_output": True}
            data = self._post("/completions", payload)
            choices = data.get("choices")
            if not isinstance(choices, list) or not choices:
                raise TeacherError(f"teacher answered without choices: {str(data)[:200]}")
            cands = []
            for ch in sorted(choices, key=lambda c: c.get("index", 0)):
                text = ch.get("text", "")
                reason = ch.get("finish_reason") or "stop"
                if reason == "stop" and not any(text.rstrip().endswith(s) for s in stepfmt.GENERATION_STOPS):
                    # servers that drop the stop string: put back the one it stopped on
                    stop = ch.get("stop_reason")
                    if isinstance(stop, str) and stop in stepfmt.GENERATION_STOPS:
                        text += stop
                tokens = int((ch.get("logprobs") or {}).get("tokens") and len(ch["logprobs"]["tokens"]) or 0)
                cands.append(Candidate(text, "length" if reason == "length" else "stop", tokens))
            out.append(cands)
        return Versioned(out, model_version=self.version)
