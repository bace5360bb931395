"""The engine: snapshots, the write/read pipelines and the collective save/load protocols."""
