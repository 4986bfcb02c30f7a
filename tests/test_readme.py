"""The README's property-testing example is real code: extract it and run it."""
import importlib.util
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_property_testing_example_runs(tmp_path):
    (block,) = [b for b in _python_blocks() if "def test_gated_attention_is_exact" in b]
    # A real file: Hypothesis reads the test's source.
    path = tmp_path / "readme_example.py"
    path.write_text(block)
    spec = importlib.util.spec_from_file_location("readme_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.test_gated_attention_is_exact()


def test_readme_quick_start_has_two_commands():
    text = README.read_text()
    quick = re.search(r"## Quick start\s+```bash\n(.*?)```", text, flags=re.S).group(1).strip().splitlines()
    assert len(quick) == 2
    assert "dhp-fx demo" in quick[0] and "pytest" in quick[1]
    ci = (README.parent / ".ci" / "run").read_text()
    assert quick[1] in ci, "CI must run the README's test command"
