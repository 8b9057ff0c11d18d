import pathlib
import re

from puzzlemoe_jax import demo

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands():
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_starts_with_two_commands_and_ci_runs_the_test_command():
    commands = readme_commands()
    assert len(commands) == 2
    assert "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci, "the README's test command must be .ci/run's command"


def test_demo_compresses_the_embedded_model_and_reports_quality(capsys):
    demo.main(["--max-windows", "2"])
    out = capsys.readouterr().out
    assert "experts: 9.00 MiB -> 4.50 MiB (0.500 of the original)" in out
    assert "rel_err_i" in out and out.count("w_down") == 16  # per-pair table: 4 layers x 4 pairs
    before, after = (float(x) for x in re.findall(r"(?:original|puzzlemoe)\s+perplexity \S+\s+bits/byte (\S+)", out))
    assert 0.5 < before < 3 and 0.5 < after < 3, (before, after)
    assert re.search(r"change\s+perplexity [+-]\d+\.\d+\s+bits/byte [+-]\d+\.\d+", out)
