"""Datasets for the recipe: load (hub id or local file) through ``datasets``, tokenize (cached),
mask prompts, pack, split, and shard across data-parallel ranks with a seeded order."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch.utils.data import DistributedSampler

from .config import ConfigError, TrainConfig
from .corpus import generate_corpus
from .stdlib_text import python_reference_documents
from .system_text import gnu_manual_documents

IGNORE = -100
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}


def corpus_path(cfg: TrainConfig) -> str:
    return os.path.join(cfg.cache_dir, f"corpus-{cfg.corpus_lines}-seed{cfg.seed}.txt")


def load_raw(cfg: TrainConfig):
    """The dataset's documents, or ``(train, eval)`` documents for a dataset with a fixed held-out split."""
    import datasets

    if cfg.dataset == "builtin:generated":
        return datasets.load_dataset("text", data_files=generate_corpus(corpus_path(cfg), cfg.corpus_lines, cfg.seed),
                                     split="train", cache_dir=os.path.join(cfg.cache_dir, "datasets"))
    if cfg.dataset in ("builtin:python-reference", "builtin:gnu-manuals"):
        try:
            train, held = (python_reference_documents if cfg.dataset == "builtin:python-reference"
                           else gnu_manual_documents)()
        except FileNotFoundError as err:
            raise ConfigError(str(err)) from None
        return datasets.Dataset.from_dict({"text": train}), datasets.Dataset.from_dict({"text": held})
    ext = os.path.splitext(cfg.dataset)[1].lower()
    try:
        if ext in LOCAL_BUILDERS:
            if not os.path.isfile(cfg.dataset):
                raise ConfigError(f"dataset file {cfg.dataset} does not exist")
            if os.path.getsize(cfg.dataset) == 0:
                raise ConfigError(f"dataset file {cfg.dataset} is empty")
            return datasets.load_dataset(LOCAL_BUILDERS[ext], data_files=cfg.dataset, split="train",
                                         cache_dir=os.path.join(cfg.cache_dir, "datasets"))
        return datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=cfg.dataset_split)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - datasets raises many types for unreadable data; say which file
        raise ConfigError(f"cannot read dataset {cfg.dataset}: {one_line(err)} (local files: valid "
                          f"{'/'.join(LOCAL_BUILDERS)}; hub ids need the network or a cache)") from None


def one_line(err: BaseException) -> str:
    """An exception's message as one line, with the cause datasets/transformers wrap it around."""
    text = " ".join(str(err).split())
    cause = err.__cause__ or err.__context__
    if cause is not None and str(cause).strip():
        text = f"{text}: {' '.join(str(cause).split())}" if text else " ".join(str(cause).split())
    text = text or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def tokenize(cfg: TrainConfig, raw, tokenizer):
    """``input_ids``/``labels`` per document; prompt tokens get label -100. Cached by ``datasets``."""
    eos = tokenizer.eos_token_id
    if cfg.prompt_field is not None:
        for col in (cfg.prompt_field, cfg.response_field):
            if col not in raw.column_names:
                raise ConfigError(f"dataset has no column {col!r}; columns: {raw.column_names}")

        def encode(batch):
            ids, labels = [], []
            _check_text(batch[cfg.prompt_field], cfg.prompt_field, cfg.dataset)
            _check_text(batch[cfg.response_field], cfg.response_field, cfg.dataset, numbers=True)
            for p, r in zip(batch[cfg.prompt_field], batch[cfg.response_field]):
                p_ids = tokenizer(cfg.prompt_template.format(prompt=p), add_special_tokens=False)["input_ids"]
                r_ids = tokenizer(str(r), add_special_tokens=False)["input_ids"] + [eos]
                ids.append(p_ids + r_ids)
                labels.append([IGNORE] * len(p_ids) + r_ids)
            return {"input_ids": ids, "labels": labels}
    else:
        if cfg.text_field not in raw.column_names:
            raise ConfigError(f"dataset has no column {cfg.text_field!r}; columns: {raw.column_names} (set text_field)")

        def encode(batch):
            _check_text(batch[cfg.text_field], cfg.text_field, cfg.dataset)
            ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in batch[cfg.text_field]]
            return {"input_ids": ids, "labels": [list(x) for x in ids]}

    try:
        return raw.map(encode, batched=True, remove_columns=raw.column_names, desc="tokenize")
    except ConfigError:
        raise
    except (UnicodeError, ValueError, TypeError) as err:  # bytes that are not UTF-8, values a tokenizer refuses
        raise ConfigError(f"cannot tokenize dataset {cfg.dataset}: {one_line(err)} (the text must be UTF-8 strings)") \
            from None


def _check_text(values: list, field: str, dataset: str, numbers: bool = False) -> None:
    """Every value of a text column is a string (a response may also be a number): a missing key or a null reads
    as None, which the tokenizer would refuse with a message that names neither the row nor the column."""
    allowed = (str, int, float) if numbers else (str,)
    for value in values:
        if not isinstance(value, allowed) or isinstance(value, bool):
            raise ConfigError(f"dataset {dataset}: a row's {field!r} is {value!r}, not text (a null, or a row "
                              f"without the key): fix or drop such rows")


def pack_or_truncate(cfg: TrainConfig, tokenized):
    """Packing: concatenate and cut into ``max_seq_len`` blocks (the tail is dropped). Otherwise each
    document is truncated to ``max_seq_len`` (padded per batch in :func:`collate`)."""
    L = cfg.max_seq_len
    if not cfg.packing:
        return tokenized.map(lambda b: {k: [x[:L] for x in b[k]] for k in ("input_ids", "labels")}, batched=True,
                             desc="truncate")

    def pack(batch):
        ids = [t for x in batch["input_ids"] for t in x]
        labels = [t for x in batch["labels"] for t in x]
        n = len(ids) // L * L
        return {"input_ids": [ids[i:i + L] for i in range(0, n, L)],
                "labels": [labels[i:i + L] for i in range(0, n, L)]}

    return tokenized.map(pack, batched=True, batch_size=1000, desc="pack")


def build_datasets(cfg: TrainConfig, tokenizer):
    """``(train, eval)``: the dataset's own held-out split, or a deterministic seeded split of the sequences."""
    raw = load_raw(cfg)
    if isinstance(raw, tuple):
        train, held = (pack_or_truncate(cfg, tokenize(cfg, part, tokenizer)) for part in raw)
        return enough_to_train(cfg, train), (held if cfg.eval_fraction > 0 else None)
    data = enough_to_train(cfg, pack_or_truncate(cfg, tokenize(cfg, raw, tokenizer)))
    n_eval = max(1, int(round(len(data) * cfg.eval_fraction))) if cfg.eval_fraction > 0 else 0
    if n_eval == 0:
        return data, None
    split = data.train_test_split(test_size=n_eval, seed=cfg.seed, shuffle=True)
    return split["train"], split["test"]


def enough_to_train(cfg: TrainConfig, data):
    """``data``, or one line when it holds fewer than two sequences."""
    if len(data) < 2:
        raise ConfigError(f"the dataset yields {len(data)} sequences of {cfg.max_seq_len} tokens: too little to train")
    return data


def check_sizes(cfg: TrainConfig, train, evals, world: int) -> None:
    """One line, before any training, when a split cannot fill one micro-batch on every rank."""
    for name, data in (("training", train), ("evaluation", evals)):
        if data is not None and len(data) // world < cfg.micro_batch_size:
            raise ConfigError(f"the {name} split has {len(data)} sequences of up to {cfg.max_seq_len} tokens: too "
                              f"few for micro_batch_size={cfg.micro_batch_size} on {world} rank(s); lower "
                              "micro_batch_size" + (" or raise eval_fraction (0: no evaluation)" if name == "evaluation"
                                                    else " or give more data"))


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    L = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), L), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def micro_batches(dataset, cfg: TrainConfig, rank: int, world: int, pad_id: int, start: int = 0,
                  shuffle: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro-batches of this rank's share, in a seeded order that depends only on the seed and
    the epoch; ``start`` skips that many micro-batches (resuming continues the same order)."""
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=cfg.seed, drop_last=True)
    per_epoch = len(sampler) // cfg.micro_batch_size
    if per_epoch == 0:
        raise ConfigError(f"{len(dataset)} sequences are too few for micro_batch_size={cfg.micro_batch_size} "
                          f"on {world} ranks")
    epoch, skip = divmod(start, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        order = list(sampler)
        for b in range(skip, per_epoch):
            idx = order[b * cfg.micro_batch_size:(b + 1) * cfg.micro_batch_size]
            yield collate([dataset[i] for i in idx], pad_id)
        epoch, skip = epoch + 1, 0
