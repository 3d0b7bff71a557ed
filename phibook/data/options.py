"""The data stages' options, typed: the single declaration of each name, default and help.

`phibook clean`, `phibook tokenize`, `phibook filter apply` and `phibook synth run` build
their flags from these classes, and `phibook pipeline`'s [clean], [tokenize], [filter] and
[synth] tables are checked against them (phibook/pipeline/config.py), so the verbs and the
pipeline cannot drift apart. No numpy, no torch: `--help` and the TOML check import this.
"""

from __future__ import annotations

from dataclasses import dataclass

from phibook.options import REQUIRED, option

DEFAULT_SHARD_TOKENS = 1 << 24  # 16.8M tokens, 32 MiB as uint16
DEFAULT_TOKENIZE_CHUNK_BYTES = 16 << 20


@dataclass
class CleanConfig:
    """`phibook clean` / [clean]: filters, exact and near dedup, decontamination."""

    near_dup_threshold: float = option(0.8, "MinHash Jaccard threshold, in (0, 1)")
    near_dup: bool = option(True, "skip MinHash near-dup removal (e.g. when datatrove does it across shards); "
                                  "in a pipeline TOML: near_dup = false")
    num_perm: int = option(128, "MinHash permutations (with the threshold, they set the LSH bands x rows)")
    shingle: int = option(5, "words per MinHash shingle")
    ngram: int = option(13, "decontamination n-gram length in words")
    min_chars: int = option(50, "drop documents shorter than this")
    max_chars: int = option(1_000_000, "drop documents longer than this")
    # Gopher-style repetition filter.
    max_dup_line_frac: float = option(0.3, "drop documents whose repeated lines hold more than this share of "
                                           "characters")
    skip_bad: bool = option(False, "count and skip malformed JSONL lines instead of failing")


@dataclass
class CleanInputs:
    """[clean]'s option that is not part of the algorithm: what to decontaminate against."""

    benchmarks: str | None = option(None, "benchmark folder (e.g. ../shared/benchmarks); its questions and "
                                          "answers are the decontamination set", path=True)


@dataclass
class TokenizeOptions:
    """`phibook tokenize` / [tokenize]."""

    tokenizer: str = option(REQUIRED, "tokenizer.json, or a folder holding one (its fingerprint goes into the "
                                      "manifest)", path=True, metavar="PATH")
    val_fraction: float = option(0.0, "hold out about this fraction of documents as the val split, chosen by a "
                                      "stable hash of each document's id (or text): deterministic, the same for "
                                      "any worker count (default: 0, no val split)", metavar="F")
    shard_tokens: int = option(DEFAULT_SHARD_TOKENS, "close a shard at the first document end that would pass N "
                                                     "tokens; a single longer document gets a shard to itself",
                               metavar="N")
    source: str | None = option(None, "source name recorded in the manifest (default: the output folder's name)",
                                metavar="NAME")
    text_field: str = option("text", "JSONL field / parquet column holding the text", metavar="FIELD")
    chunk_bytes: int = option(DEFAULT_TOKENIZE_CHUNK_BYTES, "JSONL files are split into work units of N bytes "
                                                            "(whole lines); the unit is what runs in parallel "
                                                            "and what a rerun skips once done", metavar="N")


@dataclass
class FilterOptions:
    """`phibook filter apply` / [filter]: the quality classifier's cut."""

    classifier: str = option(REQUIRED, "classifier file from `phibook filter train`", path=True)
    threshold: float | None = option(None, "keep documents whose score >= T (0..1)")
    keep_fraction: float | None = option(None, "keep the best F (0..1] of all documents (needs every score "
                                               "first, so not in pipelines)")
    embedder: str | None = option(None, "override the embedder recorded in the classifier (same name and "
                                        "dimension only)")
    batch_size: int = option(64, "documents per embedding batch")
    text_field: str = option("text", "JSON field holding the text")


@dataclass
class TeacherOptions:
    """The teacher of `phibook synth` and `phibook filter annotate` / [synth]."""

    teacher: str = option("builtin", "builtin: offline procedural exercises with verified solutions; openai: "
                                     "any OpenAI-compatible server(s); local: a phibook checkpoint or HF "
                                     "directory", choices=("builtin", "openai", "local"))
    base_url: list[str] = option([], "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1; repeat to fan "
                                     "out", metavar="URL")
    teacher_model: str = option("default", "model name sent to the endpoint")
    api_key: str | None = option(None, "API key (default: $OPENAI_API_KEY, or a dummy)")
    api: str = option("chat", "endpoint flavour", choices=("chat", "completions"))
    checkpoint: str | None = option(None, "checkpoint for --teacher local", path=True)
    temperature: float = option(0.8, "teacher sampling temperature")
    top_p: float = option(0.95, "teacher nucleus sampling")
    max_tokens: int = option(1024, "max tokens per teacher answer")
    timeout: float = option(120.0, "seconds before a request is retried")
    max_retries: int = option(5, "retries per document (429/5xx/timeouts/malformed)")


@dataclass
class SynthOptions:
    """`phibook synth run` / [synth] (with TeacherOptions)."""

    num_docs: int = option(REQUIRED, "documents in the whole job (all shards or tasks)")
    seed: int = option(0, "planning seed")
    topics: str | None = option(None, "topic file (default: the built-in seed taxonomy)", path=True)
    templates: str | None = option(None, "prompt template TOML (default: the built-in genres)", path=True)
    web_samples: str | None = option(None, "document JSONL whose excerpts are put in prompts", path=True)
    concurrency: int = option(8, "requests in flight")
