"""Text-to-region grounding (the paper's section 4.3): a phrase's words -> attention
maps of a classifier -> re-ranked region proposals; Flickr30k Entities evaluation."""
from .core import Grounder, Grounding, ground
from .phrases import ParsedPhrase, parse_phrase
from .proposals import BoxesFile, SelectiveSearch, proposal_source, read_boxes_file
from .scoring import GAMMAS, iou_matrix, nms, proposal_scores, rank_boxes
from .vocabulary import Vocabulary, imagenet_vocabulary, load_vocabulary

__all__ = ["Grounder", "Grounding", "ground", "ParsedPhrase", "parse_phrase", "BoxesFile", "SelectiveSearch",
           "proposal_source", "read_boxes_file", "GAMMAS", "iou_matrix", "nms", "proposal_scores", "rank_boxes",
           "Vocabulary", "imagenet_vocabulary", "load_vocabulary"]
