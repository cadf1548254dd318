"""Triggers: each one only *requests* a sync; none of them carries a delta."""
