"""Every error attnhooks raises is an AttnHooksError that is also the fitting builtin, defined in one
place (attnhooks.errors), so ``except attnhooks.AttnHooksError`` catches every public path."""

from __future__ import annotations

import inspect

import pytest
import torch

import attnhooks
import attnhooks.attention.kernels
from attnhooks import errors
from attnhooks.read.tiles import head_index, span

BUILTINS = (LookupError, ValueError, RuntimeError, OSError, TypeError, IndexError, FileExistsError)


def test_every_error_is_rooted_and_has_a_builtin_base():
    classes = [getattr(errors, n) for n in errors.__all__ if inspect.isclass(getattr(errors, n))]
    for cls in classes:
        if issubclass(cls, Warning):
            assert issubclass(cls, errors.AttnHooksWarning), cls
            continue
        assert issubclass(cls, errors.AttnHooksError), cls
        assert cls is errors.AttnHooksError or issubclass(cls, BUILTINS), f"{cls.__name__} has no builtin base"


def test_errors_defined_elsewhere_before_are_the_same_classes():
    from attnhooks.cli.models import ModelLoadError, TextInputError
    from attnhooks.viewer import ViewError

    assert ViewError is errors.ViewError and issubclass(ViewError, attnhooks.AttnHooksError)
    assert ModelLoadError is errors.ModelLoadError and TextInputError is errors.TextInputError


def test_reader_and_kernel_paths_raise_typed_errors():
    with pytest.raises(errors.SelectionError):
        span(5, 3, "rows")
    with pytest.raises(errors.SelectionError):
        span(slice(0, 3, 2), 3, "rows")
    with pytest.raises(errors.SelectionError):
        head_index([4], 4)
    layer = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True).eval()
    with torch.no_grad(), attnhooks.capture(layer, store="memory://typed-errors", record=("q", "k")):
        layer(torch.randn(1, 3, 8))
    st = attnhooks.open_store("memory://typed-errors")
    with pytest.raises(errors.ReadOptionError):
        st.attention(st.modules[0], 0, method="fast")
    with pytest.raises(errors.SelectionError):
        st.attention(st.modules[0], 0, heads=[2])
    with pytest.raises(errors.EmitError):
        attnhooks.emit(torch.nn.Linear(1, 1))
    with pytest.raises(errors.ShapeError):
        attnhooks.attention.kernels.attention_probs(torch.ones(1, 3, 2, 4), torch.ones(1, 2, 2, 4), None, None)
    with pytest.raises(errors.RecordOptionError):
        attnhooks.capture(torch.nn.Linear(1, 1), record="summary", summary={"topk": -1})
