"""Image-text retrieval recall (TR / IR R@1/5/10 and r_mean) as a local `evaluate` metric.

Load it by path, no Hub access: `evaluate.load(efficientvlm.training.metrics.retrieval_ranks.METRIC_DIR)` or
`load_retrieval_metric()` from that module. The computation is `efficientvlm.training.metrics.retrieval_ranks.retrieval_metrics`, so the
Trainer's `compute_metrics` and this module agree exactly.
"""

import datasets
import evaluate


def _import_retrieval_metrics():
    """`efficientvlm.training.metrics.retrieval_ranks.retrieval_metrics`: the metric is the package's own function.

    `evaluate.load` runs a copy of this file from its modules cache, so the computation is imported from the installed
    package (`pip install efficientvlm[train]`), never from a path next to this file.
    """
    try:
        from efficientvlm.training.metrics.retrieval_ranks import retrieval_metrics
    except ImportError as error:
        raise ImportError("the retrieval metric computes with efficientvlm's `efficientvlm.training` package: "
                          "`pip install 'efficientvlm[train]'` first") from error
    return retrieval_metrics


_DESCRIPTION = """\
Text retrieval (TR) and image retrieval (IR) recall at 1, 5 and 10 in percent, their means and r_mean (mean of the
six), from an image-by-text score matrix (ALBEF / X-VLM protocol: TR counts the best-ranked ground-truth caption of
each image, IR the rank of each text's image; ties count against the ground truth).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one row per image: the image's scores against all N_txt texts (the (N_img, N_txt) matrix as rows).
    references: one list per image: the indices of its ground-truth captions (img2txt).
    txt2img (optional): per text, the index of its image; default derived from `references`.
    scores_t2i (optional): (N_txt, N_img) text-to-image scores when they differ from the transpose (ITM re-ranking).
Returns:
    txt_r1, txt_r5, txt_r10, txt_r_mean, img_r1, img_r5, img_r10, img_r_mean, r_mean (percent floats).
Example:
    >>> metric = evaluate.load(METRIC_DIR)  # from efficientvlm.training.metrics.retrieval_ranks
    >>> metric.compute(predictions=[[0.9, 0.1], [0.2, 0.8]], references=[[0], [1]])["r_mean"]
    100.0
"""

_CITATION = """\
@inproceedings{wang2023efficientvlm,
  title={EfficientVLM: Fast and Accurate Vision-Language Models via Knowledge Distillation and Modal-adaptive Pruning},
  author={Wang, Tiannan and Zhou, Wangchunshu and Zeng, Yan and Zhang, Xinsong},
  booktitle={Findings of ACL}, year={2023}
}
"""


def _txt2img_from(img2txt: list, n_txt: int) -> list:
    owners = [[] for _ in range(n_txt)]
    for image, texts in enumerate(img2txt):
        for text in texts:
            if not 0 <= int(text) < n_txt:
                raise ValueError(f"references[{image}] lists text {text}, outside the {n_txt} scored texts")
            owners[int(text)].append(image)
    bad = [j for j, images in enumerate(owners) if len(images) != 1]
    if bad:
        raise ValueError(f"texts {bad[:5]} belong to {[len(owners[j]) for j in bad[:5]]} images (need exactly one); "
                         "pass txt2img explicitly")
    return [images[0] for images in owners]


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Retrieval(evaluate.Metric):
    """Retrieval recall metric; see the module docstring."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Sequence(datasets.Value("float64")),
                "references": datasets.Sequence(datasets.Value("int64")),
            }),
        )

    def _compute(self, predictions, references, txt2img=None, scores_t2i=None) -> dict:
        retrieval_metrics = _import_retrieval_metrics()
        if len(predictions) == 0:
            raise ValueError("the retrieval metric needs at least one image row")
        img2txt = [list(texts) for texts in references]
        if txt2img is None:
            txt2img = _txt2img_from(img2txt, len(predictions[0]))
        return retrieval_metrics(predictions, img2txt, list(txt2img), scores_t2i)
