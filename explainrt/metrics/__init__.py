"""Faithfulness metrics and benchmarking: insertion/deletion, Feature CAM's explanation-map
scores, map similarity, the cascading-randomisation sanity check, latency (`explainrt eval`,
`explainrt bench`).

Only NumPy-level modules are imported here; ``sanity`` (torch), ``peers`` (torch, peers),
``bench`` and ``evaluate`` (matplotlib when plotting) are imported on use.
"""
from .featurecam_scores import (ExplanationMapScore, explanation_map, explanation_map_scores, explanation_mask,
                                summarise_explanation_maps)
from .insertion_deletion import (CausalCurve, area_under_curve, blur_substrate, deletion, insertion,
                                 insertion_deletion_curves, pixel_order)
from .similarity import compare_maps, kl_divergence, load_reference_map, pearson, rankdata, sim, spearman


def cascading_randomization(*args, **kwargs):
    """See ``explainrt.metrics.sanity.cascading_randomization`` (imported lazily: needs torch)."""
    from .sanity import cascading_randomization as run

    return run(*args, **kwargs)


__all__ = ["CausalCurve", "ExplanationMapScore", "area_under_curve", "blur_substrate", "cascading_randomization",
           "compare_maps", "deletion", "explanation_map", "explanation_map_scores", "explanation_mask", "insertion",
           "insertion_deletion_curves", "kl_divergence", "load_reference_map", "pearson", "pixel_order", "rankdata", "sim",
           "spearman", "summarise_explanation_maps"]
