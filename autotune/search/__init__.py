"""The search: which layout to try next, which run to stop early, which leaders are tied."""
