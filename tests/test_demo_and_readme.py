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


def test_demo_prints_statistics_and_halves_expert_bytes(capsys):
    demo.main(["--layers", "1", "--experts", "4", "--hidden", "64", "--intermediate", "88",
               "--tokens", "8"])
    out = capsys.readouterr().out
    assert re.search(r"MoE block output rel\. error 0\.\d+", out)
    assert "rel_err_i" in out and out.count("w_down") == 2  # one row per pair (4 experts -> 2 pairs)
    assert re.search(r"expert bytes: 135,168 -> 67,584 \(50\.0 %\)", out)
