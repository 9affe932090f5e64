"""Image-text retrieval recall (TR / IR R@1/5/10 and r_mean) as a local `evaluate` metric.

Load it by path, no Hub access: `evaluate.load("<repo>/training/metrics/retrieval")` or
`training.tasks.retrieval.load_retrieval_metric()`. The computation is `training.tasks.retrieval.retrieval_metrics`, so the
Trainer's `compute_metrics` and this module agree exactly.
"""

import json
import os
import sys

import datasets
import evaluate


def _import_retrieval_metrics():
    """`training.tasks.retrieval.retrieval_metrics`, also when the `training` package is not on sys.path.

    `evaluate.load` runs a copy of this file from its modules cache and writes the original path into a JSON next to
    that copy; the repository root is three folders above the original (training/metrics/retrieval/retrieval.py).
    """
    try:
        from training.tasks.retrieval import retrieval_metrics

        return retrieval_metrics
    except ImportError as error:
        candidates = [os.path.abspath(__file__)]
        for meta_path in {os.path.splitext(__file__)[0] + ".json", __file__.split(".py")[0] + ".json"}:
            if os.path.isfile(meta_path):
                with open(meta_path, encoding="utf-8") as f:
                    candidates.append(os.path.abspath(json.load(f)["original file path"]))
        for original in candidates:
            root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(original))))
            if os.path.isfile(os.path.join(root, "training", "tasks", "retrieval.py")):
                sys.path.insert(0, root)
                sys.modules.pop("training", None)  # a failed import may have left a stale entry
                from training.tasks.retrieval import retrieval_metrics

                return retrieval_metrics
        raise ImportError("the retrieval metric needs the efficientvlm `training` package (pip install it, or load "
                          "this module from inside the repository)") from error


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
    >>> metric = evaluate.load("training/metrics/retrieval")
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
