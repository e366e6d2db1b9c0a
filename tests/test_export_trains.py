"""The export trains with open_clip, by the command its dataset card documents (issue 36, item 0),
and the Hub's libraries read its card and load it as it says (item 1).

The card's `python -m open_clip_train.main ...` command is read from the export's README.md and
parsed by open_clip_train's own argument parser; its data path then runs as `open_clip_train.main`
runs it (`open_clip_train.data.get_data`: the WebDataset pipeline with `is_train=True`, the model's
train-time preprocess and tokenizer), on the shared sample run's export (the demo's settings on the
bundled sample). Every sample of every shard must come out as an (image tensor, token ids) pair,
and one optimisation step (open_clip's ClipLoss, AdamW) of the suite's tiny open_clip model on a
batch must change its weights. Only the model (ViT-B-32 -> the tiny one), the batch size and the
worker count are swapped, for a 2-core machine: the data options are the card's.

Why webdataset is pinned to open_clip_torch[training]'s own range (<= 0.2.86, setup.cfg): from 0.2.96
on, webdataset ends each shard with an empty marker that open_clip_train's `group_by_keys_nothrow`
fails on (`KeyError: 'fname'`).
"""
from __future__ import annotations

import json
import re
import shlex
import tarfile

import pytest

pytestmark = pytest.mark.spark


def documented_command(card: str) -> list[str]:
    """The card's open_clip training command, as argv after `python -m open_clip_train.main`."""
    block = re.search(r"```bash\n(python -m open_clip_train\.main .*?)```", card, re.S)
    assert block, "the dataset card documents no open_clip_train command"
    argv = shlex.split(block.group(1).replace("\\\n", " "))
    assert argv[:3] == ["python", "-m", "open_clip_train.main"]
    return argv[3:]


def swapped(argv: list[str], **values: str) -> list[str]:
    """argv with the values of these options replaced (`batch_size="2"` -> `--batch-size 2`)."""
    out = list(argv)
    for key, value in values.items():
        i = out.index("--" + key.replace("_", "-"))
        out[i + 1] = value
    return out


def test_the_card_training_command_trains_a_tiny_clip_on_every_sample(sample_run, tiny_clip, monkeypatch):
    # tiny_clip: registers the tiny architecture with open_clip (tests/clip_fixtures.py)
    import open_clip
    import torch
    from open_clip_train.data import get_data
    from open_clip_train.distributed import init_distributed_device
    from open_clip_train.params import parse_args

    from clip_fixtures import TINY_ARCH

    out = sample_run.export_dir
    card = (out / "README.md").read_text()
    monkeypatch.chdir(out)  # the card's paths are relative to the export folder
    argv = documented_command(card)
    args = parse_args(swapped(argv, model=TINY_ARCH, batch_size="2", workers="0"))
    assert args.dataset_type == "webdataset" and args.train_data
    init_distributed_device(args)  # as open_clip_train.main does: one process, world size 1

    stats = [json.loads(p.read_text()) for p in sorted((out / "webdataset").glob("*_stats.json"))]
    samples = sum(s["successes"] for s in stats)
    assert samples > 0 and args.train_num_samples == samples  # the card counts what the shards hold

    torch.manual_seed(0)
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(TINY_ARCH)  # from scratch
    tokenizer = open_clip.get_tokenizer(TINY_ARCH)
    data = get_data(args, (preprocess_train, preprocess_val), epoch=0, tokenizer=tokenizer)
    loader = data["train"].dataloader

    batches, seen, first = 0, set(), None
    for images, texts in loader:
        assert images.ndim == 4 and images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32
        assert texts.shape == (len(images), 16) and texts.dtype == torch.long
        batches += 1
        seen |= {tuple(t.tolist()) for t in texts}
        first = first or (images, texts)
    # open_clip's epoch: ceil(samples / batch) batches (the last filled from the next pass);
    # every sample's text1, as the shards hold it (read here with tarfile), came through
    assert batches == -(-samples // 2)
    shard_texts = [tar.extractfile(m).read().decode() for p in sorted((out / "webdataset").glob("*.tar"))
                   for tar in [tarfile.open(p)] for m in tar.getmembers() if m.name.endswith(".txt")]
    assert len(shard_texts) == samples
    assert seen == {tuple(t.tolist()) for t in tokenizer(shard_texts)}

    model.train()
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    image_features, text_features, logit_scale = model(*first)[:3]
    loss = loss_fn(image_features, text_features, logit_scale)
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_the_hub_reads_the_card_and_loads_the_export_without_a_warning(sample_run, caplog):
    """huggingface_hub parses the card's metadata; `datasets.load_dataset(<export folder>)` takes the
    card's `configs` and `dataset_info` as they are (no warning, every row, the release columns)."""
    import logging
    import warnings

    import datasets
    import pandas as pd
    from huggingface_hub import DatasetCard

    out = sample_run.export_dir
    card = DatasetCard.load(out / "README.md")
    meta = card.data.to_dict()
    info = meta["dataset_info"]
    release = pd.concat(pd.read_parquet(p) for p in sorted((out / "data").glob("part-*.parquet")))
    assert info["splits"][0]["num_examples"] == len(release)
    assert info["splits"][0]["num_bytes"] == sum(p.stat().st_size for p in (out / "data").glob("part-*.parquet"))

    datasets.disable_progress_bars()
    datasets.logging.enable_propagation()  # its warnings (a card part it ignores) reach caplog
    try:
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
            warnings.simplefilter("always")
            ds = datasets.load_dataset(str(out), split="train", cache_dir=str(out.parent / "hf-cache"))
    finally:
        datasets.logging.disable_propagation()
    assert not [str(w.message) for w in caught], [str(w.message) for w in caught]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith(("datasets", "huggingface"))], \
        caplog.text
    assert ds.num_rows == len(release) and ds.column_names == list(release.columns)
