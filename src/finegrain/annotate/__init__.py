"""Region-text data generation: region proposals, then one caption per region (``finegrain annotate``)."""
