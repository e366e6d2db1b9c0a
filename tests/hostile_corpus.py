"""A hostile input corpus, built fresh in a temporary folder: every way an input file has tried to
read outside its folder, exhaust memory or smuggle credentials into the tables. Kept as
regression cases: a new attack found later gets a line here.

`build(tmp, server_url)` returns the corpus; its `secrets` are byte strings that must never appear
in any table after ingest + fetch (file contents from outside the input folder, passwords, tokens).
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

# Unique markers: finding one in a table is finding a leak.
OUTSIDE_MARKER = b"OUTSIDE-THE-INPUT-FOLDER-7f3a9c"
PASSWORD = "hunter2-pw-5e1d"
TOKEN = "tok-9b8c7d6e5f"
SIGNATURE = "sig0a1b2c3d4e5f"

FILE_CAP = 50_000  # fetch.max_bytes in the hostile test: local files are held to the same cap
RECORD_CAP = 8_000  # ingest.max_record_bytes
TEXT_CAP = 500  # ingest.max_text_chars


def png(size: tuple[int, int] = (160, 120), color: tuple[int, int, int] = (200, 90, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


@dataclass
class Corpus:
    root: Path  # the input folder
    jsonl: Path  # interleaved_jsonl input
    mmc4: Path  # mmc4 input (URLs with credentials)
    # image path -> the quarantine reason it must get
    expected_paths: dict[str, str] = field(default_factory=dict)
    secrets: list[bytes] = field(default_factory=list)


def build(tmp: Path, server_url) -> Corpus:
    """server_url(path) -> an http URL of the loopback test server."""
    outside = tmp / "SECRET.txt"
    outside.write_bytes(OUTSIDE_MARKER + b"\n")
    root = tmp / "input"
    (root / "sub").mkdir(parents=True)
    (root / "ok.png").write_bytes(png())
    (root / "sub" / "nested.png").write_bytes(png(color=(10, 120, 200)))
    os.symlink(outside, root / "link-out.png")
    os.symlink(root / "ok.png", root / "link-in.png")  # a symlink that stays inside is fine
    os.mkfifo(root / "pipe.png")
    (root / "dir.png").mkdir()
    (root / "big.png").write_bytes(png() + b"\0" * FILE_CAP)
    passwd = Path("/etc/passwd").read_bytes()[:24]  # "root:x:0:0:root:/root:..."

    expected = {
        "ok.png": "ok", "sub/nested.png": "ok", "link-in.png": "ok",
        "../SECRET.txt": "path_outside_input",
        "../../../../../../etc/passwd": "path_outside_input",
        "/etc/hostname": "path_outside_input",
        str(outside): "path_outside_input",
        "link-out.png": "path_outside_input",
        "sub/../../SECRET.txt": "path_outside_input",
        "/dev/zero": "path_outside_input",
        "/proc/self/environ": "path_outside_input",
        "pipe.png": "not_a_regular_file",
        "dir.png": "not_a_regular_file",
        "big.png": "too_large",
        "absent.png": "missing_file",
    }
    credential_page = f"https://editor:{PASSWORD}@example.com/post?token={TOKEN}&id=7"
    blocks = [{"type": "text", "text": "A cook stirs the pot while the soup simmers on the stove."}]
    blocks += [{"type": "image", "path": p, "alt": p} for p in expected]
    docs = [
        {"url": credential_page, "title": "hostile page", "blocks": blocks},
        {"url": "https://example.com/long", "blocks": [{"type": "text", "text": "word " * TEXT_CAP},
                                                        {"type": "text", "text": "A short paragraph stays."}]},
    ]
    lines = [json.dumps(d) for d in docs]
    lines.append(json.dumps({"url": "https://example.com/huge", "blocks": [{"type": "text", "text": "x" * (3 * RECORD_CAP)}]}))
    jsonl = root / "docs.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")

    image_urls = [
        server_url("/good.jpg").replace("://", f"://user:{PASSWORD}@") + f"?X-Amz-Signature={SIGNATURE}",
        server_url("/missing.jpg").replace("://", f"://admin:{PASSWORD}@") + f"?token={TOKEN}",
        f"https://user:{PASSWORD}@[2002:a00:1::]/x.jpg?sig={SIGNATURE}",  # 6to4 form of 10.0.0.1
    ]
    mmc4_doc = {"url": f"https://reader:{PASSWORD}@example.org/a?access_token={TOKEN}",
                "text_list": ["A dog runs across the wet sand of the beach."],
                "image_info": [{"raw_url": u, "matched_text_index": 0} for u in image_urls]}
    mmc4 = root / "mmc4.jsonl"
    mmc4.write_text(json.dumps(mmc4_doc) + "\n")
    secrets = [OUTSIDE_MARKER, passwd, PASSWORD.encode(), TOKEN.encode(), SIGNATURE.encode()]
    return Corpus(root=root, jsonl=jsonl, mmc4=mmc4, expected_paths=expected, secrets=secrets)
