"""Every Python block of the README runs as written on the embedded model (as doctests are run)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks may write files (a schedule JSON)
    code = compile(BLOCKS[index], f"README.md python block {index}", "exec")
    namespace = {"__name__": "__readme__"}
    exec(code, namespace)  # noqa: S102 - the README's own code, run as a user would
    if "s" in namespace and hasattr(namespace["s"], "save"):  # the schedule block: its file loads back as a plan
        assert (tmp_path / "my_schedule.json").is_file()
