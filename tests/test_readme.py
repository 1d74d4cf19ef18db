"""Every README example runs against a real service on the embedded default and prints what the README quotes."""

from __future__ import annotations

import re

import pytest
from readme import README, Runner, console_commands, examples, outputs_match, serve_embedded_copy


def test_outputs_match_tolerates_only_float_noise_and_wildcards():
    assert outputs_match('{"score": 0.912345, "x": 1}', '{"score": 0.912401, "x": 1}')
    assert not outputs_match('{"score": 0.91}', '{"score": 0.95}')
    assert not outputs_match('{"answer": "red"}', '{"answer": "blue"}')
    assert outputs_match('{"latency_ms": ...}', '{"latency_ms": 12.5}')
    assert outputs_match("a  b\nc", "a b c")
    assert not outputs_match('{"n": 3}', '{"n": 3, "more": 1}')


def test_console_blocks_pair_commands_with_their_output():
    body = "$ echo a \\\n  b\na b\n$ true\n"
    assert console_commands(body) == [("echo a \\\n  b", "a b"), ("true", "")]


def test_every_example_that_talks_to_the_service_is_run():
    text = README.read_text()
    run = {e.body for e in examples(text)}
    for block in re.findall(r"^```\w*\n(.*?)^```$", text, re.S | re.M):
        if "localhost:3000" in block or "SyncHTTPClient" in block:
            assert block in run, f"a README example is not run by this test:\n{block}"


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    scratch = tmp_path_factory.mktemp("readme")
    with serve_embedded_copy(scratch) as (base_url, env):
        workdir = scratch / "work"
        workdir.mkdir()
        yield Runner(base_url, workdir, env)


def test_readme_examples_print_what_the_readme_quotes(runner):
    checks, _ = runner.run_all(README.read_text())
    assert len(checks) >= 15
    wrong = [f"{command}\n--- README quotes:\n{quoted}\n--- it printed:\n{actual}"
             for command, quoted, actual in checks if not outputs_match(quoted, actual)]
    assert not wrong, "README outputs are stale (python tests/readme.py --write rewrites them):\n\n" + "\n\n".join(wrong)
