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
