"""Copying an HDF5 file a killed writer left open, for :meth:`~attnhooks.backends.hdf5.HDF5Backend.cleanup`:
raw chunks copied as they are (not recompressed), an array HDF5 refuses to copy whole copied chunk by chunk."""

from __future__ import annotations

import contextlib
import os

import h5py

from attnhooks.backends.hdf5attrs import decode
from attnhooks.backends.hdf5eoa import close_file, open_past_eoa
from attnhooks.backends.stacks import ATTR, GROUP, SPARE

__all__ = ["copy_group", "rewrite"]


def rewrite(path: str) -> list[str]:
    """Rewrite the file at ``path`` (left open by a killed writer) whole, aside then renamed into place,
    read through an amended superblock when it ends before the data (:mod:`~attnhooks.backends.hdf5eoa`);
    what was done and left out, for the repair report. A failure leaves the file as it was."""
    tmp = path + ".repair-tmp"
    skipped: list[str] = []
    source = open_past_eoa(path) or h5py.File(path, "r", swmr=True)
    try:
        with source as src, h5py.File(tmp, "w", libver="latest") as dst:
            try:
                copy_group(src, dst, skipped)
            except (RuntimeError, OSError, KeyError) as err:
                if int(src.attrs.get("committed", 0)):
                    raise
                _only_the_root(src, dst)  # killed in the first step: its half-made groups hold nothing committed
                skipped.append(f"nothing was committed: the store's groups left out (one did not read: {err})")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    finally:
        close_file(source)
    os.replace(tmp, path)
    return ["open-for-write flag (file rewritten)", *skipped]


def _only_the_root(src: h5py.File, dst: h5py.File) -> None:
    """``dst`` holds the root attributes of ``src`` and nothing else (a writer killed while the first
    step made its groups: HDF5 promises nothing of groups made under SWMR, and one may not read)."""
    for name in list(dst):
        del dst[name]
    for key in list(dst.attrs):
        del dst.attrs[key]
    for key, value in src.attrs.items():
        dst.attrs[key] = value


def copy_group(src: h5py.Group, dst: h5py.Group, skipped: list[str]) -> None:
    """Copy ``src`` into ``dst`` whole: attributes, groups, and each array by HDF5's own copy (raw
    chunks); an array that copy refuses is copied chunk by chunk (:func:`_copy_chunks`)."""
    _copy_attrs(src, dst, skipped)
    for name in src:
        obj = src.get(name)
        unneeded = _unneeded(src, name) if obj is None else None
        if unneeded is not None:
            skipped.append(f"{src.name}/{name}: does not open (made by a killed writer); {unneeded}")
            continue
        if obj is None:  # (h5py's items() yields None for it) the object a killed writer linked but never wrote
            raise KeyError(f"{src.name}/{name}: its object does not open (address past the file's end, or none)")
        if isinstance(obj, h5py.Group):
            copy_group(obj, dst.create_group(name), skipped)
            continue
        try:
            src.copy(obj, dst, name)
        except (RuntimeError, OSError):
            if name in dst:
                del dst[name]
            _copy_chunks(obj, dst, name, skipped)


def _unneeded(group: h5py.Group, name: str) -> str | None:
    """Why the link ``name`` of ``group``, whose object does not open, holds nothing a committed step needs,
    so that it may be left out (None: it may hold something). The spare description's group, while the
    stacks' own description reads; a stack array, or a module's group, that no copy of the description
    that reads lists (a module: its ``calls`` table, a member of a stack in every store with stacks). A
    commit lists its new stacks and members and flushes them (with the spare copy) before it counts its
    step, so an unlisted one was made in a step that was never committed."""
    if f"{group.name}/{name}" == f"/{SPARE}":
        return "the stacks' own description is kept" if _reads(group.file, GROUP, ATTR) else None
    if group.name not in (f"/{GROUP}", "/modules"):
        return None
    stacks: set[str] = set()
    members: set[str] = set()
    for path in (GROUP, SPARE):  # (what either copy lists counts as listed)
        try:
            described = decode(group.file[path].attrs[ATTR])
            named = {m[0] for stack in described.values() for m in stack.get("members", []) if m}
        except (OSError, KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError):
            continue
        stacks.update(described)
        members.update(named)
    if not stacks:
        return None
    if group.name == f"/{GROUP}":
        return None if name in stacks else "a stack no description lists (made in a commit that did not finish)"
    if f"modules/{name}/calls" in members:
        return None
    return "a module no description lists (first seen in a step that was not committed)"


def _copy_attrs(src: h5py.Group, dst: h5py.Group, skipped: list[str]) -> None:
    """Copy the attributes of ``src``; one copy of the stacks' description that does not read (torn: a writer
    killed while rewriting it) is left out when the other reads (the ``stacks`` group's and its spare's,
    :data:`~attnhooks.backends.stacks.SPARE`): readers take whichever is there."""
    other = {f"/{GROUP}": SPARE, f"/{SPARE}": GROUP}.get(src.name)
    for key in src.attrs:  # (the names are in the group's header; a value in the heap may not read)
        try:
            value = src.attrs[key]
        except OSError as err:
            if key != ATTR or other is None or not _reads(src.file, other, ATTR):
                raise
            skipped.append(f"{src.name}: its attribute {key!r} did not read ({err}); the copy in /{other} is used")
            continue
        dst.attrs[key] = value


def _reads(file: h5py.File, path: str, key: str) -> bool:
    try:
        return path in file and key in file[path].attrs and file[path].attrs[key] is not None
    except (OSError, KeyError, RuntimeError):
        return False


def _copy_chunks(ds: h5py.Dataset, dst: h5py.Group, name: str, skipped: list[str]) -> None:
    """Copy an array whose chunk index points past the file's end (HDF5 wrote the index before the
    file's end-of-allocation mark when the writer was killed; its whole-object copy then fails with
    "len not positive after adjustment for EOA"): every chunk that reads is copied raw, the others are
    left out and named in ``skipped``. Such chunks were written after the last flush, so after the
    last commit; repair cuts the array to the committed steps next, and a committed chunk left out
    would be found missing there (the arrays of steps carry checksums)."""
    space = h5py.h5s.create_simple(ds.shape, tuple(h5py.h5s.UNLIMITED if m is None else m for m in ds.maxshape))
    # the same creation properties (chunks, filters by their ids, fill value), so raw chunks copy as they are
    h5py.h5d.create(dst.id, name.encode(), ds.id.get_type(), space, dcpl=ds.id.get_create_plist())
    out = dst[name]
    for key, value in ds.attrs.items():
        out.attrs[key] = value
    lost = 0
    try:
        count = ds.id.get_num_chunks()
    except (RuntimeError, OSError):
        count = 0
        lost = -1
    for i in range(count):
        try:
            info = ds.id.get_chunk_info(i)
            mask, raw = ds.id.read_direct_chunk(info.chunk_offset)
            out.id.write_direct_chunk(info.chunk_offset, raw, mask)
        except (RuntimeError, OSError, ValueError):
            lost += 1
    if lost:
        what = "its chunk index" if lost < 0 else f"{lost} of its {count} chunk(s)"
        skipped.append(f"{ds.name}: {what} past the file's end (written after the last flush), left out")
