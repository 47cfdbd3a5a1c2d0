"""Top-1 and top-k accuracy as an `evaluate` metric module that loads from this folder.

    metric = evaluate.load("recipes/metrics/top_k_accuracy")   # no hub needed
    metric.add_batch(predictions=[[3, 1, 7, 0, 2], ...], references=[1, ...])
    metric.compute(k=5)  # {"top1": ..., "top5": ..., "count": ...}

A prediction is the list of class indices ranked by score, best first (``logits.topk(k)``);
``top1`` counts the first one, ``top{k}`` any of the first k.
"""

import datasets
import evaluate
import numpy

_DESCRIPTION = """Top-1 and top-k classification accuracy from ranked class predictions."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: per example, the predicted class indices ranked by score (best first), at
        least k of them.
    references: per example, the true class index.
    k: the k of top-k (default 5). top1 is always reported.
Returns:
    top1: fraction of examples whose best prediction is the reference.
    top{k}: fraction of examples whose reference is among the first k predictions.
    count: number of examples.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Sequence(datasets.Value("int64")),
                "references": datasets.Value("int64"),
            }),
        )

    def _compute(self, predictions, references, k=5):
        if len(references) == 0:
            return {"top1": float("nan"), f"top{k}": float("nan"), "count": 0}
        preds = numpy.asarray(predictions, dtype=numpy.int64)
        refs = numpy.asarray(references, dtype=numpy.int64)
        if preds.ndim != 2 or preds.shape[1] < k:
            raise ValueError(f"each prediction must list at least k={k} ranked classes, got "
                             f"shape {preds.shape}")
        hits = preds[:, :k] == refs[:, None]
        return {
            "top1": float(hits[:, 0].mean()),
            f"top{k}": float(hits.any(axis=1).mean()),
            "count": int(refs.shape[0]),
        }
