"""POPE: yes/no hallucination probing, per split (random / popular / adversarial).

llava (llava/eval/eval_pope.py): keep the text before the first ".", delete commas, split on
spaces; the answer is "no" if one of the words is exactly "No", "no" or "not", else "yes"
(so "NO", "Nope" or an empty output count as "yes"). Every output is a prediction. Precision,
recall, F1, accuracy; yes_ratio = share of *predicted* yes. The headline is the F1 averaged
over the splits, as LLaVA-1.5 reports POPE.
lmms-eval (tasks/pope/utils.py): the stripped, lower-cased output must equal "yes" or "no"
exactly; anything else ("yes." included) is wrong for accuracy and is left out of the TP/FP/FN
counts. Its yes_ratio is the share of *ground-truth* yes (what its code computes). Its `pope`
task pools the three splits, so the headline is the pooled F1.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

from alignti.eval.formats import EvalQuestion
from alignti.eval.scoring.matching import align, check_mode

_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def pope_parse(output: str, scoring: str = "llava") -> str:
    """The prediction "yes" / "no" (or, under lmms-eval, the unmatched text itself)."""
    if scoring == "lmms-eval":
        return output.strip().lower()
    first = output.split(".")[0] if "." in output else output
    words = first.replace(",", "").split(" ")
    return "no" if ("No" in words or "no" in words or "not" in words) else "yes"


def _ratio(a: int, b: int) -> float:
    return a / b if b else 0.0  # eval_pope.py would divide by zero; lmms-eval returns 0


def pope_metrics(preds: Sequence[str], labels: Sequence[str], scoring: str = "llava") -> dict[str, float]:
    """Accuracy, precision, recall, F1 and yes_ratio (all in percent) of parsed predictions."""
    tp = sum(p == "yes" and g == "yes" for p, g in zip(preds, labels))
    fp = sum(p == "yes" and g == "no" for p, g in zip(preds, labels))
    fn = sum(p == "no" and g == "yes" for p, g in zip(preds, labels))
    correct = sum(p == g for p, g in zip(preds, labels))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = _ratio(2 * precision * recall, precision + recall)
    yes_source = labels if scoring == "lmms-eval" else preds
    return {"accuracy": 100 * _ratio(correct, len(labels)), "precision": 100 * precision, "recall": 100 * recall,
            "f1": 100 * f1, "yes_ratio": 100 * _ratio(sum(y == "yes" for y in yes_source), len(labels)),
            "n": len(labels), "unparsed": sum(p not in ("yes", "no") for p in preds)}


def score_pope(questions: Sequence[EvalQuestion], answers: Sequence[Mapping], scoring: str = "llava") -> dict:
    """Per-split metrics under "splits", their mean under "average", the pooled ones under "all".
    "score" = average F1 (llava) or pooled F1 (lmms-eval). A missing answer is parsed as ""."""
    check_mode(scoring)
    m = align(questions, answers)
    preds = [pope_parse(out or "", scoring) for out in m.outputs]
    by_split: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    for q, p in zip(questions, preds):
        by_split[q.meta["split"]][0].append(p)
        by_split[q.meta["split"]][1].append(q.answer)
    splits = {s: pope_metrics(p, g, scoring) for s, (p, g) in sorted(by_split.items())}
    average = {k: sum(v[k] for v in splits.values()) / len(splits) for k in _METRICS}
    pooled = pope_metrics(preds, [q.answer for q in questions], scoring)
    score = average["f1"] if scoring == "llava" else pooled["f1"]
    return {"benchmark": "pope", "scoring": scoring, "score": score, "splits": splits, "average": average,
            "all": pooled, **m.counts()}
