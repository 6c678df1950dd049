"""KV-side state kept beside the Hugging Face cache (block summaries now; presses later)."""

from .summaries import BlockSummaries, block_stats

__all__ = ["BlockSummaries", "block_stats"]
