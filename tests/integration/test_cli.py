"""The ``attnhooks`` command line, round trip on small random transformers models saved to disk:
capture -> info -> view -> analyze -> repair, with exit codes, outputs and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

import attnhooks
from attnhooks.cli.main import VIEW_NAMES, main
from attnhooks.viewer.stored import VIEWS

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "mat",
    "mice",
    "day",
    "it",
    "was",
    "tired",
    "after",
    "chasing",
    "because",
    "later",
    "that",
    "evening",
    ".",
]
TEXT = "the cat sat on the mat because it was tired after chasing mice ."


def _tokenizer():
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)})


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """A BERT encoder and a Llama language model (GQA), random weights, each with a tokenizer."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    vocab = 5 + len(WORDS)
    bert = BertModel(
        BertConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    )
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            pad_token_id=0,
        )
    )
    out = {}
    for name, model in (("bert", bert), ("llama", llama)):
        folder = root / name
        folder.mkdir()
        model.save_pretrained(folder)
        _tokenizer().save_pretrained(folder)
        out[name] = folder
    out["root"] = root
    return out


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_round_trip(saved, capsys):
    store = saved["root"] / "bert.zarr"
    code, out, err = run(capsys, "capture", "--model", saved["bert"], "--prompt", TEXT, "--out", store, "--no-progress")
    assert code == 0, err
    assert "2 modules" in out and store.is_dir()
    st = attnhooks.open_store(store)
    assert st.tokens()[1][1:4] == ["the", "cat", "sat"]  # token strings stored

    code, out, _ = run(capsys, "info", store)
    assert code == 0 and "encoder.layer.1.attention.self" in out and "the cat sat" in out
    code, out, _ = run(capsys, "info", store, "--json")
    info = json.loads(out)
    assert info["status"] == "complete" and [m["heads"] for m in info["modules"]] == [4, 4]
    assert info["modules"][0]["recorded"] == ["attn", "k", "q"]

    for view, extra in (
        ("heatmap", ["--head", "1"]),
        ("model", []),
        ("head", ["--topk", "2"]),
        ("qk", ["--query", "3"]),
        ("rollout", []),
        ("metrics", []),
        ("overview", []),
        ("compare", ["--against", store]),
    ):
        png = saved["root"] / f"{view}.png"
        code, out, err = run(capsys, "view", store, view, "-o", png, *extra)
        assert code == 0, (view, err)
        assert out.strip() == str(png)
        pixels = imread(png)
        assert pixels.ndim == 3 and pixels[..., :3].std() > 0.05, view  # an image, not a blank page
    code, _, err = run(
        capsys, "view", store, "heatmap", "--module", "1", "--rows", "2:6", "-o", saved["root"] / "w.svg"
    )
    assert code == 0, err
    assert (saved["root"] / "w.svg").read_text().lstrip().startswith("<?xml")

    code, out, _ = run(capsys, "analyze", store)
    assert code == 0 and "previous" in out and "L1H" in out
    for suffix in ("csv", "json"):
        code, out, _ = run(capsys, "analyze", store, "-o", saved["root"] / f"m.{suffix}")
        assert code == 0 and "8 heads" in out
    rows = json.loads((saved["root"] / "m.json").read_text())
    assert len(rows) == 8 and {"module", "head", "entropy", "previous", "class"} <= set(rows[0])
    assert (saved["root"] / "m.csv").read_text().splitlines()[0].startswith("module,layer,head,")

    code, out, _ = run(capsys, "repair", store)
    assert code == 0 and str(store) in out
    assert attnhooks.open_store(store).steps == [0]


def test_generation_capture_with_lse_only_is_viewable(saved, capsys):
    store = saved["root"] / "gen.zarr"
    code, out, err = run(
        capsys,
        "capture",
        "--model",
        saved["llama"],
        "--prompt",
        "the cat sat",
        "--out",
        store,
        "--generate",
        "4",
        "--record",
        "q,k,lse",
        "--no-progress",
    )
    assert code == 0, err
    assert "generated 4 tokens" in out
    st = attnhooks.open_store(store)
    module = st.modules[0]
    assert st.info(module)["q_len"] == len(st.tokens()[0]) - 1  # the last generated token is never fed back
    code, _, err = run(capsys, "view", store, "qk", "--head", "3", "-o", saved["root"] / "gen.png")
    assert code == 0, err
    attn = st.attention(module, heads=3)
    assert np.allclose(attn.sum(-1), 1, atol=1e-5)
    # capturing into an existing store needs --overwrite
    code, _, err = run(capsys, "capture", "--model", saved["llama"], "--prompt", "a", "--out", store, "--no-progress")
    assert code == 1 and "exists" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(
        capsys, "capture", "--model", saved["llama"], "--prompt", "a", "--out", store, "--no-progress", "--overwrite"
    )
    assert code == 0, err


@pytest.mark.parametrize(
    ("argv", "code", "says"),
    [
        (["view", "{store}", "nope", "-o", "x.png"], 2, "invalid choice: 'nope'"),
        (["view", "{store}", "heatmap"], 2, "-o/--output"),
        (["view", "{store}", "heatmap", "-o", "x.gif"], 1, "must end in .png, .svg, .pdf"),
        (["view", "{store}", "heatmap", "--rows", "3-4", "-o", "x.png"], 2, "not a window START:STOP"),
        (["view", "{store}", "heatmap", "--module", "9", "-o", "x.png"], 1, "layer 9 is out of range"),
        (["info", "{missing}"], 1, "no such store"),
        (["analyze", "{store}", "-o", "m.txt"], 1, "must end in .csv or .json"),
        (["capture", "--model", "{missing}", "--prompt", "x", "--out", "y.zarr"], 1, "cannot load"),
        (["capture", "--model", "m", "--out", "y.zarr"], 2, "one of the arguments --text --prompt is required"),
        (["frobnicate"], 2, "invalid choice"),
        (["capture", "--model", "m", "--prompt", " ", "--out", "y.zarr"], 1, "the text is empty"),
    ],
)
def test_bad_arguments_fail_in_one_line(saved, capsys, tmp_path, argv, code, says):
    store = saved["root"] / "bad.zarr"
    if not store.exists():
        assert (
            main(["capture", "--model", str(saved["bert"]), "--prompt", TEXT, "--out", str(store), "--no-progress"])
            == 0
        )
    os.chdir(tmp_path)
    argv = [a.format(store=store, missing=tmp_path / "missing.zarr") for a in argv]
    try:
        got = main(argv)
    except SystemExit as exit:  # argparse exits on bad arguments
        got = exit.code
    err = capsys.readouterr().err
    assert got == code, err
    assert says in err
    assert len(err.strip().splitlines()) == 1, err


def test_the_installed_script_and_help():
    script = Path(sys.executable).with_name("attnhooks")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "attnhooks.cli"]
    done = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "demo" in done.stdout and "Exit codes" in done.stdout
    for sub in ("demo", "capture", "info", "view", "analyze", "repair"):
        assert main_help(sub).startswith(f"usage: attnhooks {sub}")
    done = subprocess.run([*command, "info", "/nonexistent.zarr"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert "matplotlib" not in done.stderr


def main_help(sub: str) -> str:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), pytest.raises(SystemExit) as exit:
        main([sub, "--help"])
    assert exit.value.code == 0
    return buffer.getvalue()


def test_view_names_match_the_views():
    assert set(VIEW_NAMES) == set(VIEWS)


@pytest.mark.parametrize(("flag", "value"), [("--generate", "-3"), ("--generate", "0"), ("--max-length", "0")])
def test_a_count_below_one_is_refused_before_a_store_is_made(saved, capsys, flag, value):
    store = saved["root"] / f"refused{flag}{value}.zarr"
    with pytest.raises(SystemExit) as exit_:
        main(["capture", "--model", str(saved["bert"]), "--prompt", TEXT, "--out", str(store), flag, value])
    assert exit_.value.code == 2
    assert "positive count" in capsys.readouterr().err
    assert not store.exists()
