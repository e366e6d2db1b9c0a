"""The export's README.md, a Hugging Face dataset card, rendered from the run's own numbers.

Why generated: the card's row counts, size category, shard range and training command must
match the files beside it, and a hand-edited card drifts from them on the next export. The YAML
header is built as data and dumped with PyYAML so that it always parses; the prose states only
what the pipeline does.

Licence: the texts are sentences taken from web pages (through the input corpora) and texts an
LLM wrote from them, and the images are referenced by URL. No single licence covers that, so the
card defaults to `other` and lists the input corpora's licences exactly as the operator gives
them, with a note that they do not extend to the web content itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import yaml

from udfs.export import EXTRAS_DIR, RELEASE_COLUMNS, RELEASE_DIR, WEBDATASET_DIR

PAPER = "arXiv:2502.12513"
PAPER_URL = "https://arxiv.org/abs/2502.12513"

# Hugging Face's size buckets, each an upper bound and its tag; past the last one "n>1T".
_SIZE_BUCKETS = [
    (10**3, "n<1K"), (10**4, "1K<n<10K"), (10**5, "10K<n<100K"), (10**6, "100K<n<1M"),
    (10**7, "1M<n<10M"), (10**8, "10M<n<100M"), (10**9, "100M<n<1B"), (10**10, "1B<n<10B"),
    (10**11, "10B<n<100B"), (10**12, "100B<n<1T"),
]

_COLUMN_DOCS = {
    "raw_image_url": "URL of the image as found in the source document (credentials and secret query values removed)",
    "text1": "the realistic sentence most similar to the image (CLIP cosine, two-level retrieval)",
    "text2": "the second most similar realistic sentence (null when fewer were found)",
    "text3": "the third most similar realistic sentence (null when fewer were found)",
    "syn_text": "synthetic text written by an LLM from the image and its realistic sentences",
}

_BIBTEX = """@article{gu2025realsyn,
  title   = {RealSyn: An Effective and Scalable Multimodal Interleaved Document Transformation Paradigm},
  author  = {Gu, Tiancheng and Yang, Kaicheng and Zhang, Chaoyi and Xie, Yin and An, Xiang and
             Feng, Ziyong and Liu, Dongnan and Cai, Weidong and Deng, Jiankang},
  journal = {arXiv preprint arXiv:2502.12513},
  year    = {2025}
}"""


# The models RealSyn used, by the words a model id of ours carries when it is one of them.
PAPER_CLIP = "EVA02-E-14-plus"
PAPER_LLM = "Meta-Llama-3-8B"
PAPER_CAPTIONER = "OFA-base"


@dataclass(frozen=True)
class Lineage:
    """What made the exported rows, as the pairs record it: the CLIP ids that chose text1..3
    (`pairs.embedding_model`), the LLM ids that wrote syn_text (`pairs.synthetic_model`), and the
    captioner whose captions the prompts held (None: no captioner ran)."""
    embedding_models: Sequence[str] = ()
    synthetic_models: Sequence[str] = ()
    captioner: str | None = None
    inputs: Sequence[str] = field(default_factory=tuple)  # the input files or URLs (redacted)


def lineage_warnings(lineage: Lineage) -> list[str]:
    """One line per model in the export's lineage that is not the paper's: a random init (do not
    train), a substitute, or absent."""
    from realsyn_models.clip import is_random_init

    out = []
    for model in sorted(lineage.embedding_models):
        if is_random_init(model):
            out.append(f"**Do not train on this export.** CLIP `{model}` was a random initialisation (its weights "
                       "were not available): text1, text2 and text3 were chosen by a model that has learned "
                       "nothing, so they are not the sentences most similar to the image.")
        elif PAPER_CLIP not in model:
            out.append(f"CLIP `{model}` stands in for the paper's {PAPER_CLIP}: text1..3 and the similarity band "
                       "are that model's, not RealSyn's.")
    for model in sorted(lineage.synthetic_models):
        if PAPER_LLM not in model:
            out.append(f"`{model}` wrote syn_text in place of the paper's LLaMA-3-8B.")
    if lineage.captioner is None:
        out.append(f"No captioner ran (the paper uses {PAPER_CAPTIONER}): the prompts that wrote syn_text held no "
                   "image caption.")
    elif PAPER_CAPTIONER not in lineage.captioner:
        out.append(f"Captions came from `{lineage.captioner}` in place of the paper's {PAPER_CAPTIONER}.")
    return out


def size_category(n: int) -> str:
    """Hugging Face's `size_categories` tag for n rows (a bucket includes its lower bound)."""
    if n < 0:
        raise ValueError("row count must be >= 0")
    return next((tag for bound, tag in _SIZE_BUCKETS if n < bound), "n>1T")


def shard_pattern(num_shards: int, digits: int = 5) -> str:
    """The brace pattern webdataset and open_clip expand to every shard name, `{00000..00012}`."""
    if num_shards < 1:
        raise ValueError("need at least one shard")
    if num_shards == 1:
        return f"{0:0{digits}d}"
    return f"{{{0:0{digits}d}..{num_shards - 1:0{digits}d}}}"


def render_card(name: str, subsets: Mapping[str, int], funnel: Sequence[tuple[str, str, int]], *,
                num_rows: int, num_bytes: int = 0, webdataset_shards: int = 0, webdataset_samples: int = 0,
                urls: int = 0, lineage: Lineage = Lineage(), license: str = "other",
                license_name: str | None = None, input_licenses: Mapping[str, str] | None = None,
                language: Sequence[str] = ("en",)) -> str:
    """README.md text for an export.

    `subsets`: name -> rows (e.g. per source corpus, or nested size subsets), shown as a table.
    `funnel`: (path, step, rows surviving it) in pipeline order, a path being what is counted
    (documents, images, sentences, ...). `num_rows` / `num_bytes`: rows and bytes of the release
    parquet. `webdataset_shards` / `webdataset_samples`: what the image shards hold (0 when the
    export is URLs only). `urls`: rows with a `raw_image_url` (0: local images only, no fetch
    recipe). `lineage`: the models behind the rows (a warning block for each one not the paper's).
    `input_licenses`: input corpus -> licence, as the operator sets them. Every path in the card is
    relative to the export folder."""
    data_glob = f"{RELEASE_DIR}/part-*.parquet"
    header = {
        "pretty_name": name,
        "license": license,
        **({"license_name": license_name} if license_name else {}),
        "language": list(language),
        "task_categories": ["zero-shot-image-classification", "image-to-text"],
        "tags": ["clip", "image-text", "realsyn", "synthetic-captions", "webdataset"],
        "size_categories": [size_category(num_rows)],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": data_glob}]}],
        "dataset_info": {
            "features": [{"name": c, "dtype": "string"} for c in RELEASE_COLUMNS],
            "splits": [{"name": "train", "num_bytes": int(num_bytes), "num_examples": int(num_rows)}],
        },
    }
    parts = [
        "---\n" + yaml.safe_dump(header, sort_keys=False, allow_unicode=True, width=1000) + "---",
        f"# {name}",
        *_warnings(lineage_warnings(lineage)),
        _what_it_is(num_rows),
        _funnel_table(funnel),
        _subsets_table(subsets),
        _columns(),
        _loading(data_glob, webdataset_shards, urls),
        _training(webdataset_shards, webdataset_samples),
        _source_data(lineage.inputs, input_licenses or {}),
        _personal_information(),
        _limitations(lineage_warnings(lineage)),
        _licence(license, input_licenses or {}),
        "## Citation\n\n```bibtex\n" + _BIBTEX + "\n```",
    ]
    return "\n\n".join(parts) + "\n"


def _what_it_is(num_rows: int) -> str:
    return (
        "## What it is\n\n"
        f"An image–multi-text dataset of {num_rows:,} images built the way RealSyn "
        f"([{PAPER}]({PAPER_URL})) builds its data from interleaved image–text web documents: "
        "images and sentences are extracted and filtered, duplicates removed, and each image is "
        "paired with its three most similar realistic sentences from the whole sentence corpus "
        "(a cluster-then-within-cluster search over CLIP embeddings) and one synthetic text "
        "written by an LLM. The columns follow the released RealSyn parquet; training draws one "
        "of the four texts at random per step.\n\n"
        f"- `{RELEASE_DIR}/`: the release parquet (`{', '.join(RELEASE_COLUMNS)}`).\n"
        f"- `{EXTRAS_DIR}/`: lineage per row (`image_id` and pipeline columns), row i of each "
        f"`{EXTRAS_DIR}` file describing row i of the `{RELEASE_DIR}` file of the same name.\n"
        f"- `{WEBDATASET_DIR}/`: image shards in img2dataset's layout, when exported.\n"
        "- `manifest.json`: size and SHA-256 of every file."
    )


def _warnings(lines: list[str]) -> list[str]:
    if not lines:
        return []
    return ["> [!WARNING]\n> This export was not built with the paper's models:\n>\n"
            + "\n".join(f"> - {line}" for line in lines)]


def _funnel_table(funnel: Sequence[tuple[str, str, int]]) -> str:
    """Each step a share of the previous step of the same path: images of images, sentences of
    sentences (never sentences of images)."""
    lines = ["## Funnel", "", "| path | step | rows | of the previous step of its path |", "|---|---|---:|---:|"]
    previous: dict[str, int] = {}
    for path, step, rows in funnel:
        before = previous.get(path)
        share = f"{rows / before:.1%}" if before else "—"
        lines.append(f"| {path} | {step} | {rows:,} | {share} |")
        previous[path] = rows
    return "\n".join(lines)


def _subsets_table(subsets: Mapping[str, int]) -> str:
    lines = ["## Subsets", "", "| subset | rows |", "|---|---:|"]
    lines += [f"| {name} | {rows:,} |" for name, rows in subsets.items()]
    return "\n".join(lines)


def _columns() -> str:
    lines = ["## Columns", "", "| column | type | content |", "|---|---|---|"]
    lines += [f"| `{c}` | string | {_COLUMN_DOCS[c]} |" for c in RELEASE_COLUMNS]
    return "\n".join(lines)


def _loading(data_glob: str, shards: int, urls: int) -> str:
    text = (
        "## How to load\n\n"
        "From the export folder (`load_dataset(\"<export folder>\")` reads this card's `configs` too):\n\n"
        "```python\n"
        "from datasets import load_dataset\n\n"
        f'ds = load_dataset("parquet", data_files={{"train": "{data_glob}"}}, split="train")\n'
        "```"
    )
    if urls:
        text += (
            "\n\nFetching the images yourself with img2dataset gives the layout of `webdataset/` "
            "(224 px on the smaller side, only when larger; JPEGs that need no resize kept as they are):\n\n"
            "```bash\n"
            f"img2dataset --url_list {RELEASE_DIR} --input_format parquet --url_col raw_image_url "
            "--caption_col text1 --save_additional_columns '[\"text2\",\"text3\",\"syn_text\"]' "
            f"--output_format webdataset --output_folder {WEBDATASET_DIR} --image_size 224 "
            "--resize_mode keep_ratio --resize_only_if_bigger True --skip_reencode True --encode_quality 95\n"
            "```"
        )
    else:
        text += ("\n\nThe images were local files of the input, not URLs (`raw_image_url` is null in every "
                 "row): they are in the `webdataset/` shards only, and no tool can fetch them again.")
    if shards:
        text += (
            "\n\nThe bundled shards hold `<key>.jpg`, `<key>.txt` (text1) and `<key>.json` (all four "
            "texts, `image_id`, URL, key, sizes):\n\n"
            "```python\n"
            "import webdataset as wds\n\n"
            f'ds = wds.WebDataset("{WEBDATASET_DIR}/{shard_pattern(shards)}.tar", shardshuffle=False)'
            '.decode("pilrgb").to_tuple("jpg", "json")\n'
            "```"
        )
    return text


def _training(shards: int, samples: int) -> str:
    if not shards:
        return ("## Training\n\nThis export holds no image shards; fetch them as above, then train "
                "with open_clip on the resulting `.tar` files.")
    urls = f"{WEBDATASET_DIR}/{shard_pattern(shards)}.tar"
    return (
        "## Training\n\n"
        "From the export folder, with open_clip, installed as `pip install 'open_clip_torch[training]'` (that extra keeps "
        "webdataset at 0.2.86 or older, which its loader needs; it reads `.txt`, i.e. text1 only; "
        "model and schedule here are placeholders):\n\n"
        "```bash\n"
        "python -m open_clip_train.main --dataset-type webdataset \\\n"
        f'    --train-data "{urls}" --train-num-samples {samples} \\\n'
        "    --model ViT-B-32 --batch-size 256 --epochs 32 --workers 8\n"
        "```\n\n"
        "To draw one of the four texts per step, as RealSyn trains, read them from `.json`:\n\n"
        "```python\n"
        "import random\n"
        "import webdataset as wds\n\n"
        'TEXTS = ("text1", "text2", "text3", "syn_text")\n\n\n'
        "def image_and_text(sample):\n"
        '    meta = sample["json"]\n'
        '    return sample["jpg"], random.choice([meta[k] for k in TEXTS if meta.get(k)])\n\n\n'
        f'loader = (wds.WebDataset("{urls}", shardshuffle=100)\n'
        '          .shuffle(1000).decode("pilrgb").map(image_and_text))\n'
        "```"
    )


def _source_data(inputs: Sequence[str], input_licenses: Mapping[str, str]) -> str:
    lines = ["## Source data", "",
             "Interleaved image–text web documents (OBELICS / MMC4-style pages), read from:", ""]
    lines += [f"- `{i}`" for i in inputs] or ["- (not recorded)"]
    if not input_licenses:
        lines += ["", "**No licence was set for any input** (`export.input_licenses`): find out the inputs' "
                  "terms before using or sharing this export."]
    return "\n".join(lines)


def _personal_information() -> str:
    return (
        "## Personal and sensitive information\n\n"
        "The sentences are text from web pages and can carry names, places and other personal "
        "details of real people; the images can show people. What the pipeline removes: "
        "credentials in URLs, titles, alt texts and metadata (user:password@, signed-URL and "
        "token parameters), exact and near-duplicate images and sentences, and sentences outside "
        "the length, entropy and perplexity rules. What it does not remove: names, faces, "
        "addresses or other personal data in the sentences or images, and offensive content "
        "(there is no NSFW, toxicity or PII filter)."
    )


def _limitations(warnings: list[str]) -> str:
    text = (
        "## Bias, risks and limitations\n\n"
        "- text1..3 are retrieved, not written for the image: they are the corpus sentences most "
        "similar to it under CLIP, and can be loosely related or wrong (retrieval noise), more so "
        "for images unlike anything in the corpus.\n"
        "- syn_text is written by an LLM from those sentences and the caption, and can state "
        "things the image does not show.\n"
        "- The web pages' choice of topics, languages and people carries through; semantic "
        "balancing caps large clusters but does not correct that."
    )
    if warnings:
        text += "\n- The substitutions listed at the top of this card apply to every row."
    return text


def _licence(license: str, input_licenses: Mapping[str, str]) -> str:
    lines = [
        "## Licence",
        "",
        f"Declared licence: `{license}`. The texts are sentences extracted from web pages (through "
        "the input corpora below) and texts an LLM generated from them; the images come from the "
        "same pages (referenced by URL, and copied into the shards when bundled) and remain their "
        "owners'. The licences below are those of the input corpora as "
        "the operator of this export set them; they do not grant rights in the underlying web "
        "content. Check them, and the terms of the LLM used for `syn_text`, before use.",
        "",
    ]
    if input_licenses:
        lines += ["| input | licence |", "|---|---|"]
        lines += [f"| {name} | {lic} |" for name, lic in input_licenses.items()]
    else:
        lines.append("No input licences were set for this export.")
    return "\n".join(lines)
