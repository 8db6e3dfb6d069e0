"""Dataset layouts: caption manifests of every format, and label folders (AI Hub, ActivityNet) -> rows."""
