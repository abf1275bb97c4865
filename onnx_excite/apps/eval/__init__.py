"""Evaluation protocols of Zhang et al. (ECCV 2016): the pointing game (4.1) and
dominant-object localization (4.2), on PASCAL VOC or COCO-format datasets; and the
faithfulness protocol (deletion / insertion, ROAD) of :mod:`.faithfulness`."""
from .datasets import ImageRecord, Mask, Obj, read_coco, read_dataset, read_voc
from .mapping import ClassMapping, bundled_mappings, resolve_mapping
from .result import EvalResult, load_results
from .run import run_evaluation
from .faithfulness import run_faithfulness

__all__ = ["ImageRecord", "Mask", "Obj", "read_coco", "read_voc", "read_dataset", "ClassMapping",
           "bundled_mappings", "resolve_mapping", "run_evaluation", "run_faithfulness", "EvalResult", "load_results"]
