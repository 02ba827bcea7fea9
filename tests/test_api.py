"""The README's Python API example runs as written (in a temporary folder)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    section = README.read_text().split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "'eval/rewards/brevity/mean'" in printed and "'eval/kl'" in printed
    assert (tmp_path / "runs" / "notebook" / "metrics.jsonl").is_file()


def test_import_rlgen_is_light_and_names_resolve():
    import rlgen

    assert rlgen.PPOConfig.__module__ == "rlgen.config.stages"
    assert callable(rlgen.train_ppo) and set(rlgen.__all__) <= set(dir(rlgen))
