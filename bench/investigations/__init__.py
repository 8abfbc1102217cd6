"""One-off investigations: questions a protocol benchmark raised, answered once, run as
``python -m bench.investigations.<name>``; each writes ``bench/results/<name>.json``."""
