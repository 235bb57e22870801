"""The public API: one sorted __all__, every name importable from morphc, documented once."""

import subprocess
import sys
from pathlib import Path

import morphc

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_all_is_sorted_and_every_name_resolves():
    assert morphc.__all__ == sorted(morphc.__all__)
    for name in morphc.__all__:
        assert getattr(morphc, name) is not None, name
    assert set(morphc.__all__) <= set(dir(morphc))


def test_every_public_name_is_in_the_readme():
    missing = [n for n in morphc.__all__ if n != "__version__" and f"`{n}`" not in README]
    assert not missing, f"document these in README's Public API table: {missing}"


def test_errors_share_one_base():
    errors = [getattr(morphc, n) for n in morphc.__all__ if n.endswith("Error")]
    assert all(issubclass(e, morphc.MorphcError) for e in errors)


def test_importing_morphc_does_not_import_torch():
    code = "import sys, morphc; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"


def test_an_unknown_name_is_an_attribute_error():
    try:
        morphc.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("expected AttributeError")
