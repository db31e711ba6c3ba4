"""Attention over images: ViT patch maps (as vit-explain), diffusion cross-attention maps (as DAAM).

The pure functions turn attention into a 2-D heat map (:func:`patch_map`,
:func:`cross_attention_map`, :func:`upsample`); :func:`image_overlay` draws a heat map over an
image. The overlay is upsampled in numpy before drawing, so a saved PDF or SVG shows the same
smooth map as the screen (matplotlib's own interpolation is not applied by vector backends).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from matplotlib.axes import Axes
from matplotlib.colors import Normalize

from attnhooks.viewer._common import ViewError, as_numpy, new_axes

__all__ = ["cross_attention_map", "image_overlay", "patch_map", "patch_overlay", "upsample"]

Float = npt.NDArray[np.float64]
HeadFusion = Literal["mean", "max", "sum"]


def upsample(map2d: Any, shape: tuple[int, int]) -> Float:
    """Bilinear resize of ``[h, w]`` to ``shape = (H, W)``, in numpy.

    Pixel centres are aligned as in ``torch.nn.functional.interpolate(mode="bilinear",
    align_corners=False)`` (and OpenCV's ``resize``): a constant map stays constant and the
    value of cell ``(i, j)`` lands on the pixels around ``((i + 0.5) · H/h, (j + 0.5) · W/w)``.
    Shrinking does no anti-aliasing. NaN spreads to the pixels it touches.

    Args:
        map2d: ``[h, w]`` values.
        shape: ``(H, W)`` the output size.

    Returns:
        ``[H, W]`` float64.

    Example:
        >>> upsample([[0.0, 1.0]], (1, 4)).tolist()
        [[0.0, 0.25, 0.75, 1.0]]
    """
    a = as_numpy(map2d, name="map2d", ndim=2)
    out_h, out_w = (int(s) for s in shape)
    if out_h < 1 or out_w < 1:
        raise ViewError(f"upsample(shape={shape}): use a positive (height, width)")
    i0, i1, fy = _taps(a.shape[0], out_h)
    j0, j1, fx = _taps(a.shape[1], out_w)
    rows = a[i0] * (1 - fy)[:, None] + a[i1] * fy[:, None]
    return rows[:, j0] * (1 - fx) + rows[:, j1] * fx


def patch_map(
    attn: Any,
    *,
    grid: tuple[int, int] | None = None,
    query: int = 0,
    prefix: int = 1,
    heads: HeadFusion | int = "mean",
) -> Float:
    """A ViT query's attention over the image patches, as the patch grid ``[gh, gw]``.

    Takes row ``query`` (the [CLS] token by default), fuses the heads, drops the first
    ``prefix`` keys (CLS and register tokens) and reshapes the rest, in row-major order, to the
    patch grid. A rollout matrix (:func:`attnhooks.analysis.rollout`) works the same way: that is
    vit-explain's map.

    Args:
        attn: ``[heads, q, k]`` attention of one layer, or ``[q, k]`` (one head, or a rollout).
        grid: ``(gh, gw)`` patches per column and row; default: square, ``gh = gw = sqrt(k - prefix)``.
        query: the row to show (0: [CLS]).
        prefix: how many keys come before the patches (1 for [CLS]; 5 for [CLS] + 4 registers).
        heads: ``"mean"``, ``"max"``, ``"sum"`` or one head's index (``[q, k]`` input: ignored).

    Returns:
        ``[gh, gw]`` float64.

    Example:
        >>> import numpy as np
        >>> attn = np.zeros((1, 5, 5))  # [heads=1, q=5, k=5]: [CLS] + 2x2 patches
        >>> attn[0, 0, 1 + 3] = 1.0  # [CLS] attends patch (1, 1)
        >>> patch_map(attn).tolist()
        [[0.0, 0.0], [0.0, 1.0]]
    """
    a = as_numpy(attn, name="attn")
    if a.ndim not in (2, 3):
        raise ViewError(
            f"patch_map: attn has shape {a.shape}; expected [heads, q, k] or [q, k]: pick a layer (attn[layer])"
        )
    q, k = a.shape[-2:]
    if not 0 <= query < q:
        raise ViewError(f"patch_map(query={query}) for {q} rows: use a row in 0..{q - 1}")
    if not 0 <= prefix < k:
        raise ViewError(f"patch_map(prefix={prefix}) for {k} keys: use the number of non-patch keys, 0..{k - 1}")
    row = _fuse(a[..., query, prefix:], heads) if a.ndim == 3 else a[query, prefix:]
    gh, gw = _grid(k - prefix, grid, what="patches", fix="pass grid=(rows, cols), or the right prefix")
    return row.reshape(gh, gw)


def cross_attention_map(
    layers: Any,
    token: int | Sequence[int],
    *,
    shape: tuple[int, int] | None = None,
    heads: HeadFusion | int = "sum",
    aspect: float = 1.0,
    normalize: bool = True,
) -> Float:
    """DAAM: where a text token's cross-attention falls on the image, summed over layers.

    For each array: take the token's key column(s) (summed), fuse the heads, reshape the query
    positions to the latent grid (``h · w = q`` with ``w / h = aspect``), upsample bilinearly to
    ``shape``, and sum over the arrays. Arrays may come from different UNet blocks (64, 256,
    1024... query positions) and different timesteps.

    Args:
        layers: a sequence of ``[heads, q, k_text]`` (or ``[q, k_text]``) cross-attention arrays, or
            one array ``[layers, heads, q, k_text]``.
        token: the text key index, or several (their columns are summed, e.g. a word's sub-tokens).
        shape: ``(H, W)`` of the output; default: the largest latent grid among the arrays.
        heads: ``"sum"`` (as DAAM), ``"mean"``, ``"max"``, or one head's index.
        aspect: latent width / height (1.5 for a 768×512 image).
        normalize: divide by the maximum (when positive), as DAAM does.

    Returns:
        ``[H, W]`` float64.

    Example:
        >>> import numpy as np
        >>> low = np.zeros((2, 4, 3)); low[:, 3, 1] = 1.0  # [heads=2, q=2x2, k_text=3]
        >>> cross_attention_map([low], token=1).tolist()
        [[0.0, 0.0], [0.0, 1.0]]
    """
    arrays = list(layers) if not hasattr(layers, "ndim") or layers.ndim == 4 else [layers]
    if not arrays:
        raise ViewError("cross_attention_map got no arrays: pass a sequence of [heads, q, k_text] arrays")
    tokens = [int(token)] if isinstance(token, (int, np.integer)) else [int(t) for t in token]
    maps = [_token_grid(layer, tokens, heads, aspect) for layer in arrays]
    if shape is None:
        shape = max((m.shape for m in maps), key=lambda s: s[0] * s[1])
    total: Float = np.sum([upsample(m, shape) for m in maps], axis=0)
    top = float(np.nanmax(total))
    return total / top if normalize and top > 0 else total


def image_overlay(
    heat: Any,
    image: Any = None,
    *,
    ax: Axes | None = None,
    alpha: float = 0.6,
    fade: bool = True,
    cmap: str = "inferno",
    patch_grid: bool = False,
    title: str | None = None,
    colorbar: bool = True,
) -> Axes:
    """Draw a heat map over an image; returns the Axes.

    ``heat`` is upsampled bilinearly (:func:`upsample`) to the image's size and drawn with an
    opacity of ``alpha · heat / max(heat)`` (``fade=True``): the hot regions are coloured and the
    image shows through where the heat is 0; ``fade=False`` gives an even opacity ``alpha``.
    Without an image the heat map is drawn alone, cell by cell.

    Args:
        heat: ``[h, w]`` non-negative map (:func:`patch_map`, :func:`cross_attention_map`).
        image: ``[H, W]`` grey, ``[H, W, 3|4]`` RGB(A), or ``[3|4, H, W]`` (torch layout); uint8,
            or float in ``[0, 1]``. None: the heat map alone.
        ax: axes to draw in; None makes a new figure.
        alpha: the overlay's opacity where the heat is largest.
        fade: let the opacity fall with the heat (True), or keep it at ``alpha`` (False).
        cmap: colour map of the heat.
        patch_grid: draw the ``h × w`` cell boundaries (the patches of a ViT).
        title: the axes title.
        colorbar: add a colour bar of the heat.

    Returns:
        The Axes drawn in. ``ax.images[-1]`` is the heat layer (its array is ``[H, W]``).

    Example:
        >>> import numpy as np
        >>> ax = image_overlay(np.eye(4), np.zeros((32, 32, 3), dtype=np.uint8))
        >>> ax.images[-1].get_array().shape
        (32, 32)
    """
    h = as_numpy(heat, name="heat", ndim=2)
    fig, ax = new_axes(ax)
    top = float(np.nanmax(h)) if np.isfinite(h).any() else 0.0
    vmax = top if top > 0 else 1.0
    norm = Normalize(0.0, vmax)
    if image is None:
        layer = ax.imshow(h, cmap=cmap, norm=norm, interpolation="nearest")
        size = h.shape
    else:
        picture = _as_image(image)
        size = picture.shape[:2]
        ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, interpolation="nearest")
        smooth = upsample(h, size)
        opacity = np.clip(np.nan_to_num(alpha * smooth / vmax if fade else np.full(size, alpha)), 0.0, 1.0)
        layer = ax.imshow(smooth, cmap=cmap, norm=norm, alpha=opacity, interpolation="nearest")
    if patch_grid:
        _draw_cells(ax, h.shape, size)
    ax.set_xticks([])
    ax.set_yticks([])
    if colorbar:
        fig.colorbar(layer, ax=ax, shrink=0.8)
    if title is not None:
        ax.set_title(title, fontsize=10)
    return ax


def patch_overlay(
    attn: Any,
    image: Any = None,
    *,
    grid: tuple[int, int] | None = None,
    query: int = 0,
    prefix: int = 1,
    heads: HeadFusion | int = "mean",
    ax: Axes | None = None,
    title: str | None = None,
) -> Axes:
    """:func:`patch_map` drawn by :func:`image_overlay` with the patch grid; returns the Axes.

    Args:
        attn: ``[heads, q, k]`` or ``[q, k]`` (one head, or a rollout), as in :func:`patch_map`.
        image: the input image (see :func:`image_overlay`), or None.
        grid, query, prefix, heads: as in :func:`patch_map`.
        ax: axes to draw in; None makes a new figure.
        title: the axes title; default names the query row.

    Returns:
        The Axes drawn in.

    Example:
        >>> import numpy as np
        >>> ax = patch_overlay(np.full((2, 5, 5), 0.2))  # [heads=2, q=5, k=5]: [CLS] + 2x2 patches
        >>> ax.images[-1].get_array().shape
        (2, 2)
    """
    heat = patch_map(attn, grid=grid, query=query, prefix=prefix, heads=heads)
    name = "[CLS]" if query == 0 and prefix > 0 else f"row {query}"
    return image_overlay(heat, image, ax=ax, patch_grid=True, title=title or f"{name} → patches, heads {heads}")


def _taps(n_in: int, n_out: int) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], Float]:
    """Source indices below and above each output pixel centre, and the weight of the upper one."""
    src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
    lo = np.floor(src).astype(np.intp)
    return lo, np.minimum(lo + 1, n_in - 1), src - lo


def _fuse(values: Float, heads: HeadFusion | int) -> Float:
    """Combine axis 0 (heads): ``"mean"``, ``"max"``, ``"sum"``, or pick one head."""
    out: Float
    if isinstance(heads, (int, np.integer)):
        if not 0 <= heads < values.shape[0]:
            raise ViewError(f"heads={heads} for {values.shape[0]} heads: use a head in 0..{values.shape[0] - 1}")
        out = values[int(heads)]
    elif heads in ("mean", "max", "sum"):
        out = getattr(values, heads)(axis=0)
    else:
        raise ViewError(f"heads={heads!r}: use 'mean', 'max', 'sum' or a head index")
    return out


def _grid(count: int, grid: tuple[int, int] | None, *, what: str, fix: str, aspect: float = 1.0) -> tuple[int, int]:
    """``grid`` checked against ``count`` cells, or the grid with ``w / h = aspect`` that holds them."""
    if grid is None:
        gh = max(1, round(float(np.sqrt(count / aspect))))
        grid = (gh, count // gh)
    gh, gw = (int(g) for g in grid)
    if gh * gw != count:
        shape = "a square" if aspect == 1.0 else f"a {aspect:g}:1 grid"
        raise ViewError(f"{count} {what} do not fill {shape} ({gh}×{gw}): {fix}")
    return gh, gw


def _token_grid(layer: Any, tokens: list[int], heads: HeadFusion | int, aspect: float) -> Float:
    """One cross-attention array's map of ``tokens``: ``[h, w]`` with ``w / h = aspect``."""
    if not hasattr(layer, "shape"):
        layer = np.asarray(layer, dtype=np.float64)
    shape = tuple(layer.shape)
    if len(shape) not in (2, 3):
        raise ViewError(f"a cross-attention array has shape {shape}; expected [heads, q, k_text] or [q, k_text]")
    if not tokens or min(tokens) < 0 or max(tokens) >= shape[-1]:
        raise ViewError(f"token {tokens} for {shape[-1]} text keys: use key indices in 0..{shape[-1] - 1}")
    column = as_numpy(layer[..., tokens], name="cross-attention").sum(axis=-1)  # slice first: torch/dask stay lazy
    column = _fuse(column, heads) if column.ndim == 2 else column
    fix = "pass aspect=width/height of the latent image"
    return column.reshape(_grid(column.shape[0], None, what="query positions", fix=fix, aspect=aspect))


def _as_image(image: Any) -> npt.NDArray[Any]:
    """``image`` as ``[H, W]`` or ``[H, W, 3|4]``: uint8 kept, float checked in [0, 1]."""
    if hasattr(image, "detach"):  # torch, without importing it
        image = image.detach().cpu().numpy()
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (3, 4) and a.shape[-1] not in (3, 4):
        a = np.moveaxis(a, 0, -1)  # [C, H, W] -> [H, W, C]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise ViewError(f"image has shape {a.shape}; expected [H, W], [H, W, 3|4] or [3|4, H, W]")
    if a.dtype == np.uint8 or a.ndim == 2:
        return a
    a = a.astype(np.float64)
    if np.nanmin(a) < 0 or np.nanmax(a) > 1:
        raise ViewError(
            f"a float RGB image must lie in [0, 1]; got [{np.nanmin(a):g}, {np.nanmax(a):g}]: divide by 255"
        )
    return a


def _draw_cells(ax: Axes, cells: tuple[int, int], size: tuple[int, int]) -> None:
    """Thin lines on the boundaries of ``cells`` (rows, cols) across an image of ``size`` pixels."""
    for i in range(1, cells[0]):
        ax.axhline(i * size[0] / cells[0] - 0.5, color="white", lw=0.4, alpha=0.5)
    for j in range(1, cells[1]):
        ax.axvline(j * size[1] / cells[1] - 0.5, color="white", lw=0.4, alpha=0.5)
