"""Without the optional extra, the tracr converter says in one line how to install it (no traceback from jax)."""

import sys

import pytest

from toylens.model import tracr as tl_tracr


@pytest.mark.parametrize("missing", ["tracr", "jax", "haiku"])
def test_missing_tracr_names_the_extra(monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # import of it raises ImportError
    for call in (lambda: tl_tracr.from_tracr(object()), lambda: tl_tracr.compile_program(object(), {1}, 3)):
        with pytest.raises(ImportError) as err:
            call()
        assert str(err.value) == tl_tracr.INSTALL and "\n" not in str(err.value)
        assert "pip install 'toylens[tracr]'" in str(err.value)
        assert err.value.__cause__ is None and err.value.__suppress_context__
