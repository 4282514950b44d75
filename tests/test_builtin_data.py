"""The offline default's real text and pretrained base: the Python reference split, the shipped base against
its own record, and the pretraining script end to end at toy size."""

import json
import os

import pytest
import torch

from psilora_ds.recipe.config import parse
from psilora_ds.recipe.data import build_datasets
from psilora_ds.recipe.modeling import STDLIB_LLAMA, build_model, build_tokenizer
from psilora_ds.recipe.pretrain import PretrainConfig, blocks, mean_loss, pretrain_base, text_sha256
from psilora_ds.recipe.stdlib_text import python_reference_documents, python_source_documents


def test_reference_split_is_fixed_and_disjoint():
    from pydoc_data.topics import topics

    train, held = python_reference_documents()
    texts = [topics[k] for k in sorted(topics)]
    assert held == texts[::10] and len(held) == 8
    assert not set(train) & set(held) and len(set(train)) == len(train)  # "if" repeats the held-out "else"
    assert set(train) | set(held) == set(texts)
    assert python_reference_documents() == (train, held)  # no seed: every run evaluates on the same topics
    src_train, src_held = python_source_documents()
    assert len(src_train) > 50 and "def " in src_train[0] and not set(src_train) & set(src_held)


def test_recipe_evaluates_on_the_held_out_topics(tmp_path):
    cfg = parse(["--cache_dir", str(tmp_path), "--max_seq_len", "64"])
    assert (cfg.model, cfg.dataset) == ("builtin:stdlib-llama", "builtin:python-reference")
    tok = build_tokenizer(cfg)
    train, evals = build_datasets(cfg, tok)
    _, held = python_reference_documents()
    expected = blocks(held, tok, 64)
    assert len(evals) == len(expected)
    assert torch.equal(torch.tensor(evals["input_ids"]), expected)  # packed in order, nothing from training
    for seed in ("1", "7"):
        _, other = build_datasets(parse(["--cache_dir", str(tmp_path), "--max_seq_len", "64", "--seed", seed]), tok)
        assert other["input_ids"] == evals["input_ids"]
    assert len(train) > 10 * len(evals) / 2


def test_shipped_base_is_what_its_record_says(tmp_path):
    """The weights in psilora_ds/assets are the ones pretrain.json measured: the held-out loss on the source
    files recomputed here (bf16 weights loaded in fp32, as the recipe loads them) equals the recorded one (on
    another Python, whose standard library differs, it is only checked to be far below a uniform guess)."""
    with open(os.path.join(STDLIB_LLAMA, "pretrain.json")) as f:
        record = json.load(f)
    cfg = parse(["--cache_dir", str(tmp_path)])
    tok = build_tokenizer(cfg)
    assert len(tok) == record["config"]["vocab_size"]
    model = build_model(cfg, tok, torch.device("cpu"))
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n) == record["parameters"]
    base = model.get_base_model()
    _, held = python_source_documents()
    data = blocks(held, tok, record["config"]["seq_len"])
    with model.disable_adapter():
        loss = mean_loss(base, data, 16)
    if text_sha256(held) == record["held_out_source_sha256"]:  # the same standard library as when it was made
        assert loss == pytest.approx(record["eval_loss_python_source"], rel=1e-4)
    assert loss < 0.6 * torch.log(torch.tensor(float(len(tok)))).item()  # far below a uniform guess: pretrained


def test_pretrain_script_builds_a_base_the_recipe_fine_tunes(tmp_path):
    out = tmp_path / "base"
    record = pretrain_base(str(out), PretrainConfig(hidden=16, layers=1, vocab_size=300, seq_len=32, batch_size=4,
                                                    steps=3, warmup=1))
    assert record["train_tokens_seen"] == 3 * 4 * 32 and os.path.isfile(out / "pretrain.json")
    assert pretrain_base(str(out), PretrainConfig()) == record  # a finished base is left as it is
    cfg = parse(["--model", str(out), "--cache_dir", str(tmp_path / "cache"), "--max_seq_len", "32"])
    tok = build_tokenizer(cfg)
    assert len(tok) == 300
    model = build_model(cfg, tok, torch.device("cpu"))
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_gnu_manuals_are_info_nodes_with_a_fixed_held_out_split(tmp_path):
    """builtin:gnu-manuals: one document per Info node long enough to be prose, every tenth held out, whatever the
    seed; a machine without the manuals is one error line naming them."""
    import gzip

    from psilora_ds.recipe.system_text import MANUALS, MIN_NODE_CHARS, gnu_manual_documents

    for m, name in enumerate(MANUALS):
        nodes = [f"File: {name}.info,  Node: n{i}\n\n" + f"{name} section {i} prose. " * (MIN_NODE_CHARS // 10)
                 for i in range(6)]
        text = "preamble\n\x1f\n" + "\n\x1f\n".join([*nodes, "Tag Table:\nNode: n0\x7f1"]) + "\n\x1fEnd"
        with gzip.open(tmp_path / f"{name}.info.gz", "wt") as f:
            f.write(text)
    train, held = gnu_manual_documents(str(tmp_path))
    assert len(train) + len(held) == 6 * len(MANUALS) and len(held) == -(-6 * len(MANUALS) // 10)
    assert held[0].startswith(f"File: {MANUALS[0]}.info,  Node: n0") and not set(train) & set(held)
    assert all(not d.startswith("Tag Table") for d in train + held)
    for name in MANUALS[: len(MANUALS) // 2 + 1]:
        (tmp_path / f"{name}.info.gz").unlink()
    with pytest.raises(FileNotFoundError, match="needs the GNU Info manuals"):
        gnu_manual_documents(str(tmp_path))
