from rstar import steps


def test_stop_strings_are_the_spec_markers():
    assert steps.STOP_STRINGS == ("<end_of_step>", "<end_of_code>", "<end_of_answer>")


def test_prompt_has_spec_instruction_few_shot_and_code_priming():
    p = steps.render_prompt("What is 2+3?", [])
    assert p.count("<|user|>:") == 3  # two worked examples + the question
    assert "<|user|>:\nWhat is 2+3?\n\n<|assistant|>: Let's think step by step and solve the problem with code." in p
    assert p.endswith("<code>\n")
    bare = steps.render_prompt("What is 2+3?", [], few_shot=False)
    assert bare.startswith("<|user|>:\nWhat is 2+3?") and bare.count("<|user|>:") == 1


def test_prompt_continues_after_steps():
    s1 = "<code>\n# Step 1: add\nx = 2 + 3\n<end_of_step>"
    p = steps.render_prompt("Q", [s1], few_shot=False)
    assert p.endswith(s1) and p.count("<code>") == 1


def test_parse_code_step():
    st = steps.parse_step("\n# Step 2: halve\ny = x / 2\n<end_of_step>")
    assert st.code == "# Step 2: halve\ny = x / 2"
    assert st.complete and not st.ends_code and not st.is_answer and st.answer is None


def test_parse_end_of_code_and_answer_steps():
    st = steps.parse_step("\n# Now print the final answer\nprint(y)\n<end_of_code>")
    assert st.ends_code and st.code.endswith("print(y)")
    ans = steps.parse_step("\n<answer>From the result, the answer is \\boxed{\\frac{1}{2}}.<end_of_answer>")
    assert ans.is_answer and ans.answer == "\\frac{1}{2}" and ans.code == ""


def test_incomplete_step():
    assert not steps.parse_step("# Step 1: a very long").complete


def test_extract_boxed_nested_and_last():
    assert steps.extract_boxed("\\boxed{1} then \\boxed{\\frac{a}{b^{2}}}") == "\\frac{a}{b^{2}}"
    assert steps.extract_boxed("no box") is None
    assert steps.extract_boxed("\\boxed{unclosed") is None


def test_program_reruns_the_whole_code_block():
    s1 = "<code>\n# Step 1\nx = 3\n<end_of_step>"
    s2 = "\n# Step 2\ny = x * 4\n<end_of_step>"
    prog = steps.assemble_program([s1, s2], "\n# Step 3\nprint(y)\n<end_of_code>")
    assert prog == "# Step 1\nx = 3\n# Step 2\ny = x * 4\n# Step 3\nprint(y)\n"
    ns = {}
    exec(prog.replace("print(y)", "out = y"), ns)
    assert ns["out"] == 12


def test_program_starts_fresh_after_output():
    s1 = "<code>\n# Step 1\nx = 3\nprint(x)\n<end_of_code>"
    out = steps.output_step("3")
    assert out == "\n<output>3<end_of_output>"
    s3 = "<code>\n# Step 1\nz = 1\n<end_of_step>"
    assert steps.assemble_program([s1, out], s3) == "# Step 1\nz = 1\n"


def test_first_candidate_gets_code_marker():
    assert steps.normalize_candidate("# Step 1\nx=1\n<end_of_step>", True).startswith("<code>\n")
    assert steps.normalize_candidate("\n# Step 2\n<end_of_step>", False).startswith("\n# Step 2")


def test_error_output_is_failure():
    assert steps.output_is_failure("NameError: name 'x' is not defined")
    assert not steps.output_is_failure("42")


def test_model_written_output_closes_the_code_block():
    text = "\n# Now print\nprint(y)\n<output>12<end_of_output>\n<answer>so \\boxed{12}.<end_of_answer>"
    norm = steps.normalize_candidate(text, False)
    assert norm == "\n# Now print\nprint(y)\n<end_of_code>"
    st = steps.parse_step(norm)
    assert st.ends_code and not st.is_answer and st.code.endswith("print(y)")
    # generation stops there too
    assert "<output>" in steps.GENERATION_STOPS
    assert steps.normalize_candidate("\nprint(1)\n<output>", False).endswith("print(1)\n<end_of_code>")


# --- classify_candidate: the one meaning of a generated step ---


def test_classify_code_steps():
    st = steps.classify_candidate("# Step 1\nx=1\n<end_of_step>", "stop", is_first=True)
    assert (st.kind, st.text, st.code, st.well_formed) == (steps.CODE, "<code>\n# Step 1\nx=1\n<end_of_step>",
                                                           "# Step 1\nx=1", True)
    st = steps.classify_candidate("\nprint(x)\n<end_of_code>", "stop")
    assert st.kind == steps.ENDS_CODE and st.ends_code and st.answer is None


def test_classify_answer_steps():
    st = steps.classify_candidate("\n<answer>From the result, the answer is \\boxed{7}.<end_of_answer>")
    assert (st.kind, st.answer, st.well_formed) == (steps.ANSWER, "7", True)
    # no <answer> marker but no code either: still an answer step
    assert steps.classify_candidate("\nSo the answer is \\boxed{7}.<end_of_answer>").answer == "7"
    # ended by end of sequence: an answer, though not well-formed
    st = steps.classify_candidate("\nThe answer is \\boxed{7}", "stop")
    assert st.is_answer and not st.well_formed
    # cut off by the token limit: a failure, whatever it holds
    st = steps.classify_candidate("\n<answer>\\boxed{7} and more", "length")
    assert (st.kind, st.failure, st.answer) == (steps.FAILURE, "length", None)


def test_classify_failures():
    assert steps.classify_candidate("<answer>seven<end_of_answer>").failure == "unboxed_answer"
    assert steps.classify_candidate("\n# so \\boxed{7}\nx = 7\n<end_of_step>").failure == "answer_in_code"
    assert steps.classify_candidate("\n<end_of_step>").failure == "empty"
    assert steps.classify_candidate("\nx = 1", "stop").failure == "incomplete"
    assert steps.classify_candidate("\nx = 1", "length").failure == "length"


def test_model_written_system_markers_cut_the_step():
    demo = ("\nprint(total)\n<end_of_output>\n<answer>so \\boxed{42.0}<end_of_answer>")
    st = steps.classify_candidate(demo, "stop")
    assert (st.kind, st.text, st.cut_at, st.answer) == (steps.ENDS_CODE, "\nprint(total)\n<end_of_code>",
                                                        "<end_of_output>", None)
    for marker in ("<|user|>", "<|im_start|>", "<|assistant|>", "<answer>", "<output>"):
        st = steps.classify_candidate(f"\nprint(total)\n{marker}: 42 \\boxed{{42}}<end_of_answer>", "length")
        assert st.kind == steps.ENDS_CODE and st.cut_at == marker and not st.well_formed
    # inside an answer step: a new turn or a second answer ends it; the first answer stands
    st = steps.classify_candidate("\n<answer>\\boxed{3}.\n<|user|>: \\boxed{4}<end_of_answer>")
    assert (st.answer, st.text) == ("3", "\n<answer>\\boxed{3}.<end_of_answer>")
    st = steps.classify_candidate("\n<answer>\\boxed{3}.\n<answer>\\boxed{4}<end_of_answer>")
    assert st.answer == "3"
    # markers only count before the step's stop string (a real policy returns nothing after it)
    st = steps.classify_candidate("\nprint(x)\n<end_of_code>\n<output>5<end_of_output>")
    assert (st.text, st.cut_at, st.well_formed) == ("\nprint(x)\n<end_of_code>", "", True)


def test_normalize_candidate_is_the_classifiers_text():
    for text in ("# Step 1\nx=1\n<end_of_step>", "\nprint(1)\n<output>", "\n<answer>\\boxed{1}<end_of_answer>"):
        assert steps.normalize_candidate(text, True) == steps.classify_candidate(text, "stop", True).text


def test_local_policy_stops_where_every_policy_stops(tiny_model_dir):
    import torch

    from rstar.local_policy import HFPolicy
    from rstar.protocols import GenerationItem, SamplingParams

    pol = HFPolicy(tiny_model_dir, few_shot=False, batch_size=2)
    seen = {}

    def scripted_generate(input_ids=None, attention_mask=None, **kw):
        seen.update(kw)
        cont = pol.tok("\nprint(x)\n<output>5<end_of_output>", return_tensors="pt",
                       add_special_tokens=False)["input_ids"].repeat(input_ids.shape[0], 1)
        return torch.cat([input_ids, cont], dim=1)

    pol.model.generate = scripted_generate
    out = pol.generate([GenerationItem("q", ("<code>\nx = 5\n<end_of_step>",), 1, 0)],
                       SamplingParams(temperature=0.0, max_tokens=64))
    assert seen["stop_strings"] == list(steps.GENERATION_STOPS)
    assert out[0][0].text == "\nprint(x)\n<output>" and out[0][0].finish_reason == "stop"
