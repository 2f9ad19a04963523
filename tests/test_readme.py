"""Every Python snippet of README.md runs as written on this machine, each in a fresh interpreter the way a user
pastes it (no TRITON_INTERPRET: on a CPU the ops take their reference path, as they do for a user), and none makes
a library warn about how it is called: the README cannot drift from the code. Code that needs several processes
(```py excerpts) is a verbatim excerpt of an examples/ script that tests/test_distributed.py runs."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
EXCERPTS = re.findall(r"```py\n(.*?)```", README.read_text(), re.S)


def test_readme_has_snippets():
    assert len(SNIPPETS) >= 7, "README.md lost its per-family examples"


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index, tmp_path):
    code = SNIPPETS[index]
    if "from transformers" in code and importlib.util.find_spec("transformers") is None:
        pytest.skip("needs transformers (pip install torchext[hf])")
    script = tmp_path / f"readme_snippet_{index}.py"
    script.write_text(code)
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run([sys.executable, "-W", "default", str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"README snippet {index} failed:\n{code}\n{done.stderr[-3000:]}"
    # A warning raised at a line of the snippet itself: the README calls something in a deprecated way.
    own_warnings = [line for line in done.stderr.splitlines() if f"{script.name}:" in line and "Warning" in line]
    assert not own_warnings, "\n".join(own_warnings)


def _code_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("index", range(len(EXCERPTS)))
def test_readme_excerpt_is_in_an_example(index):
    """A ```py block (multi-process code, not run here) appears line for line, in one run, in an examples/ script."""
    excerpt = _code_lines(EXCERPTS[index])
    for script in sorted((README.parent / "examples").glob("*.py")):
        lines = _code_lines(script.read_text())
        if any(lines[i:i + len(excerpt)] == excerpt for i in range(len(lines))):
            return
    pytest.fail(f"README excerpt {index} is in no examples/ script:\n{EXCERPTS[index]}")
