"""Build the bundled sample: the public-domain recipes (../shared/data/recipes) in OBELICS form.

OBELICS rows are parallel `images` / `texts` lists plus JSON `metadata` / `general_metadata`;
we add `image_bytes` (parallel to `images`) so the demo needs no network. Photos are scaled down
to at most MAX_SIDE px (WebP, quality 80) to keep the repository light; that is still well above
the paper's 100 px minimum side. Image blocks whose file is missing upstream are left out (the
interleaved-jsonl reader shows that case instead).

One page is planted at the end: a "reposted" page whose sentences are light rewrites of sentences
kept from the recipes (a comma, an article, a word), so the demo shows semantic sentence dedup at
work: each pair must end with one sentence kept (tests/test_sentence_dedup.py uses the same list).

    python tools/build_sample.py ../shared/data/recipes sample/recipes.obelics.parquet
"""
import io
import json
import sys
from pathlib import Path

from PIL import Image

import pyarrow as pa
import pyarrow.parquet as pq

SITE = "https://publicdomainrecipes.com"
MAX_SIDE = 384
PLANTED_URL = "https://example.org/planted/reposted-recipe-steps"
# (sentence kept from the recipes, its planted near-duplicate)
PLANTED_NEAR_DUPLICATES = [
    ("Place the vegetables on baking paper in a baking tray.",
     "Place the vegetables on baking paper on a baking tray."),
    ("Peel the egg and cut it in half.", "Peel the egg, then cut it in half."),
    ("Mince the garlic, peel the carrot, peel and cut the onion in half.",
     "Mince the garlic, peel the carrot, then peel and cut the onion in half."),
    ("Grill meat over a medium-high flame for 4-5 minutes per side, or until cooked through.",
     "Grill the meat over a medium-high flame for 4-5 minutes per side, or until it is cooked through."),
    ("Remove the seeds from your squash, then peel it and chop it up into large cubes, then set aside.",
     "Remove the seeds from the squash, then peel it and chop it up into large cubes and set aside."),
    ("If necessary, add a bit of water to completely cover the cabbage.",
     "If needed, add a bit of water to completely cover the cabbage."),
    ("Add the beans, season to taste, mix until combined, and simmer for an additional 2 minutes.",
     "Add the beans, season to taste, mix until combined, then simmer for another 2 minutes."),
]


def shrink(path: Path) -> bytes:
    image = Image.open(path)
    image.thumbnail((MAX_SIDE, MAX_SIDE))
    out = io.BytesIO()
    image.convert("RGB").save(out, "WEBP", quality=80)
    return out.getvalue()


def convert(doc: dict, root: Path) -> dict:
    images, texts, metadata, blobs = [], [], [], []
    for block in doc["blocks"]:
        if block["type"] == "text":
            images.append(None), texts.append(block["text"]), metadata.append(None), blobs.append(None)
            continue
        path = root / block["path"]
        if not path.is_file():
            continue
        name = path.name
        images.append(f"{SITE}/pix/{name}")
        texts.append(None)
        metadata.append({"src": f"{SITE}/pix/{name}", "alt_text": block.get("alt"), "formatted_filename": name})
        blobs.append(shrink(path))
    return {
        "images": images,
        "texts": texts,
        "metadata": json.dumps(metadata),
        "general_metadata": json.dumps({"url": doc["url"], "title": doc.get("title")}),
        "image_bytes": blobs,
    }


def planted_page() -> dict:
    texts = [planted for _, planted in PLANTED_NEAR_DUPLICATES]
    return {"images": [None] * len(texts), "texts": texts, "metadata": json.dumps([None] * len(texts)),
            "general_metadata": json.dumps({"url": PLANTED_URL, "title": "Planted near-duplicates (demo fixture)"}),
            "image_bytes": [None] * len(texts)}


def main(src: str, dst: str) -> None:
    root = Path(src)
    rows = [convert(json.loads(line), root) for line in (root / "docs.jsonl").open()] + [planted_page()]
    schema = pa.schema([
        ("images", pa.list_(pa.string())), ("texts", pa.list_(pa.string())),
        ("metadata", pa.string()), ("general_metadata", pa.string()),
        ("image_bytes", pa.list_(pa.binary())),
    ])
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), dst, compression="zstd", row_group_size=64)
    print(f"{len(rows)} documents -> {dst}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
