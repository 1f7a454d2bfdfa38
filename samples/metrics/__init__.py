"""Image metrics of ``guidance-evaluate``: Frechet distance (:mod:`.frechet`), precision and recall
(:mod:`.precision_recall`), saturation (:mod:`.saturation`) and the feature extractors (:mod:`.features`)."""
