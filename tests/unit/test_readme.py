"""The README's snippets are copy-paste true: every Python block runs, the TOML loads."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from guard.engine.config import Config

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_the_readme_opens_with_the_demo_and_the_test_command() -> None:
    first = blocks("bash")[0]
    assert "pip install -e . && loopguard demo" in first
    assert "pip install -e '.[dev]' && python -m pytest" in first
    ci = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    assert "pip install -e '.[dev]' && python -m pytest\n" in ci


@pytest.mark.parametrize("code", blocks("python"), ids=lambda c: c.splitlines()[0])
def test_python_snippet_runs(code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-readme-snippet")  # the user's own key, as usual
    namespace: dict[str, object] = {"__name__": "readme_snippet"}
    exec(compile(code, "README.md", "exec"), namespace)
    guard = namespace.get("guard")
    if guard is not None and hasattr(guard, "close"):
        guard.close()


@pytest.mark.parametrize("text", blocks("toml"))
def test_toml_snippet_loads(text: str) -> None:
    config = Config.from_mapping(tomllib.loads(text))
    assert config.routes
