"""CIDEr-D of generated captions as in the COCO caption toolkit, as a local `evaluate` metric.

Load it by path, no Hub access: `evaluate.load("<efficientvlm.training.metrics>/cider")`. The computation is
`efficientvlm.training.metrics.caption_scores.cider_d` (pycocoevalcap's CiderScorer with document frequencies from the
evaluated references, PTB-style tokenization in pure Python), so scripts using this module and the captioning task's
evaluation agree exactly. Document frequencies come from ALL references passed (add_batch accumulates them), so
compute over the whole evaluation set at once, as the toolkit does.
"""

import datasets
import evaluate


def _import_cider_d():
    """`efficientvlm.training.metrics.caption_scores.cider_d`: the metric is the package's own function.

    `evaluate.load` runs a copy of this file from its modules cache, so the computation is imported from the installed
    package (`pip install efficientvlm[train]`), never from a path next to this file.
    """
    try:
        from efficientvlm.training.metrics.caption_scores import cider_d
    except ImportError as error:
        raise ImportError("the caption CIDEr metric computes with efficientvlm's `efficientvlm.training` package: "
                          "`pip install 'efficientvlm[train]'` first") from error
    return cider_d


_DESCRIPTION = """\
CIDEr-D of image captions exactly as the COCO caption evaluation toolkit (pycocoevalcap `Cider()`): captions
lower-cased and PTB-tokenized with punctuation removed; tf-idf vectors of 1..4-grams with document frequencies over the
images of the evaluated set; candidate weights clipped by the reference weights; Gaussian length penalty (sigma 6);
mean over orders and references, ×10, mean over images. Scores are on the toolkit's scale (about 0..10; papers report
it ×100, e.g. "CIDEr 120.0" for 1.2).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one generated caption (string) per image.
    references: per image, a list of its reference captions (at least one); they are also the idf corpus.
Returns:
    cider: float (toolkit scale; a one-image set always scores 0 because every idf is log(1/1) = 0).
Example:
    >>> metric = evaluate.load(path_to_this_folder)
    >>> metric.compute(predictions=["a dog runs on grass", "two birds fly over water"],
    ...                references=[["a dog runs on grass"], ["two birds fly over water"]])["cider"]
    10.0
"""

_CITATION = """\
@inproceedings{vedantam2015cider,
  title={CIDEr: Consensus-based Image Description Evaluation},
  author={Vedantam, Ramakrishna and Zitnick, C. Lawrence and Parikh, Devi},
  booktitle={CVPR}, year={2015}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Cider(evaluate.Metric):
    """Caption CIDEr-D metric; see the module docstring."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Value("string"),
                "references": datasets.Sequence(datasets.Value("string")),
            }),
        )

    def _compute(self, predictions, references) -> dict:
        return {"cider": _import_cider_d()(list(predictions), [list(refs) for refs in references])}
