"""A new encoder in front of an index without re-indexing it: calibration pairs, compensators
(query-drift compensation), score scales across versions, and the judged checks that guard activation."""
