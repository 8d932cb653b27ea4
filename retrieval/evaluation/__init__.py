"""Retrieval quality on M-BEIR and BEIR data: hit rate, recall, nDCG and MRR at k."""
