"""capgen: captions -> prompts -> engine -> validated queries (-> curation -> shards)."""
__version__ = "0.1.0"
