"""One line per drop or quarantine reason: what it means and the way out (the setting to change,
or the place to look). The runner stores the hints of a stage's reasons in `runs.notes`
(`hint:<reason>`) and the closing summary prints those of the run's largest reasons, so a user
who sees `drops: path_outside_input=40` also reads what to do about it.

A reason carries its stage's prefix where one stage counts several kinds (`fetch_timeout`,
`image_undecodable`, `sentence_semantic_duplicate`): `hint` looks the rest up.
"""
from __future__ import annotations

_README = "README 'Hostile input'"

HINTS: dict[str, str] = {
    # ingest: a record or an image slot quarantined (README: 'Quarantine reasons')
    "bad_json": "a line that is not JSON (cut short, or not jsonl): check ingest.format and the file; "
                "`quarantine.raw` holds its start",
    "not_an_object": "a JSON value that is not an object: check ingest.format",
    "missing_field": "a record without a field its format needs: check ingest.format (obelics, mmc4, "
                     "interleaved_jsonl)",
    "wrong_type": "a field of the wrong type, metadata nested too deep, or bytes that are not base64: "
                  "`quarantine.detail` names the field",
    "length_mismatch": "OBELICS images/texts/metadata lists of different lengths: the record is malformed",
    "bad_slot": "an OBELICS position with both or neither of text and image: the record is malformed",
    "bad_reference": "an MMC4 matched_text_index outside text_list: the record is malformed",
    "non_utf8": "invalid UTF-8 or a lone surrogate in a string field: re-encode the input as UTF-8",
    "control_char": "NUL or another control character in a text, title, alt text or metadata: clean the input",
    "empty_doc": "a page with no text and no image left",
    "missing_file": "a local image path that does not exist: check the path against the file's folder "
                    "(or ingest.local_root)",
    "bad_url": "an image or page URL that is not http(s) or holds a control character",
    "bad_path": "an empty image path, or a control character (NUL...) in it",
    "record_too_large": "a line longer than ingest.max_record_bytes: raise it if such records are genuine",
    "text_too_long": "a paragraph longer than ingest.max_text_chars: raise it if such texts are genuine",
    "unreadable_file": "a whole input file could not be read (corrupt parquet, permissions, a file name that is "
                       "not UTF-8): `quarantine.detail` says why",
    "path_outside_input": "a local image path that resolves outside the input folder: set ingest.local_root to a "
                          "folder above it, or list its folder in ingest.allow_absolute_roots",
    "not_a_regular_file": "a local image path naming a folder, device, FIFO or socket: point it at a file",
    "parse_error": "a record the parser could not handle: `quarantine.detail` has the exception; please "
                   "report it with the record",
    "superseded_in_run": "a record of a page that a later record of the same run replaces (same URL): "
                         "nothing to do",
    # fetch (prefixed fetch_): README 'Hostile input'
    "http_error": "the server answered 4xx: the image is gone or forbidden; nothing to do",
    "server_error": "the server answered 5xx: retried in later runs up to fetch.max_attempts_total (fetch.retry_failed)",
    "rate_limited": "the server answered 429: lower fetch.per_host_rate / per_host_concurrency; retried in later runs",
    "timeout": "no answer within fetch.read_timeout_s / total_timeout_s: raise them for slow hosts; retried in later runs",
    "connection_error": "DNS or TCP failed: retried only if transient; check the host",
    "too_many_redirects": "more redirects than fetch.max_redirects",
    "bad_content_type": "the server sent something that is not an image (HTML, JSON...)",
    "not_image": "the bytes are not an image, whatever the server said",
    "opted_out": "the server or URL opted out of AI training (X-Robots-Tag noai...): respected by design",
    "blocked_address": f"the URL, or a redirect, resolves to a private or reserved address: refused by design ({_README})",
    "no_source": "an image slot with neither bytes nor a URL: nothing to fetch",
    "too_large": "more bytes than fetch.max_bytes (or embed.max_image_bytes): raise it if such images are wanted",
    # image_quality: the paper's image rules (docs/architecture.md)
    "no_bytes": "no image bytes reached the rule: see the fetch drops",
    "undecodable": "Pillow cannot decode the bytes: corrupt or not an image",
    "truncated": "the image file is cut short",
    "format_not_allowed": "an image format outside image_quality.formats",
    "decompression_bomb": "more pixels than image_quality.max_pixels: refused before decoding",
    "animated": "an animated image (GIF/WebP/APNG): the paper keeps stills (image_quality.drop_animated)",
    "too_small": "shorter side below image_quality.min_side (the paper's 100 px)",
    "aspect_ratio": "aspect ratio outside image_quality.min_aspect..max_aspect (the paper's 1/3..3)",
    # image_dedup, semantic_dedup
    "perceptual_duplicate": "a near copy (pHash within image_dedup.phash_max_hamming) of a kept image",
    "semantic_duplicate": "within semantic_dedup.<kind>.threshold cosine of a kept item: lower the threshold "
                          "to keep more (`realsyn calibrate dedup`)",
    # embed (prefixed image_ / sentence_ / text_)
    "missing_bytes": "no bytes in image_bytes for a kept image: run fetch again",
    "empty_bytes": "zero-length image bytes",
    "too_many_pixels": "the header says more pixels than embed.max_pixels",
    "empty_text": "an empty text: nothing to embed",
    # sentences: the paper's sentence rules (docs/sentence-rules.md)
    "emoji": "a sentence with emoji: the paper's rule",
    "url": "a sentence holding a URL: the paper's rule",
    "too_few_words": "fewer than sentences.min_words words (the paper's 3)",
    "too_many_words": "more than sentences.max_words words (the paper's 81)",
    "no_relation_or_action": "no relation or action (the paper's CAT rule): docs/sentence-rules.md",
    "low_entropy": "word entropy below sentences.min_entropy (the paper's 0.3)",
    "low_perplexity": "perplexity below the LM's min_perplexity: `realsyn calibrate perplexity` fits the band "
                      "to your LM",
    "high_perplexity": "perplexity above the LM's max_perplexity: `realsyn calibrate perplexity` fits the band "
                       "to your LM",
    "exact_duplicate": "an occurrence of a sentence already kept (folded into its row): nothing to do",
    # retrieve
    "fewer_than_k": "an image with fewer than retrieve.k sentences in its probed clusters: raise retrieve.nprobe "
                    "or retrieve.fallback_probes",
    # generate, similarity_band (udfs/generate.py: judge)
    "error": "the LLM backend failed on the prompt (`synthetic_texts.error`); retried up to generate.max_attempts",
    "empty": "the LLM wrote nothing after cleaning",
    "refusal": "the LLM declined: another model or prompt (generate.prompt) helps",
    "prompt_leak": "the LLM echoed the instruction: adjust generate.prompt",
    "copy_of_sentence": "the LLM returned the sentence unchanged: adjust generate.prompt",
    "not_english": "the LLM answered in another language",
    "too_long": "longer than generate.max_chars",
    "below_band": "image–text similarity below the CLIP's min_similarity (models.<clip>.min_similarity)",
    "above_band": "image–text similarity above the CLIP's max_similarity (models.<clip>.max_similarity)",
}

_PREFIXES = ("fetch_", "image_", "sentence_", "text_")


def hint(reason: str) -> str | None:
    """The reason's hint, its stage prefix (`fetch_`, `image_`, ...) removed when needed."""
    if reason in HINTS:
        return HINTS[reason]
    for prefix in _PREFIXES:
        if reason.startswith(prefix) and reason[len(prefix):] in HINTS:
            return HINTS[reason[len(prefix):]]
    return None

