"""The stream list of `data.train` / `data.val`: "PATH_OR_URL[@PROPORTION], ...".

Kept free of heavy imports: the config checks it when a YAML file is loaded.
"""

from dataclasses import dataclass

REMOTE_SCHEMES = ("s3://",)


@dataclass(frozen=True)
class StreamSpec:
    """One MDS shard directory: a local path or a remote URL, and its share of the mix."""

    # Local directory or remote URL (s3://bucket/prefix) holding index.json and the shards.
    path: str
    # Share of the samples drawn from this stream; None = in proportion to its size.
    proportion: float | None = None

    @property
    def is_remote(self) -> bool:
        return self.path.startswith(REMOTE_SCHEMES)


def parse_streams(spec: str) -> list[StreamSpec]:
    """`"s3://b/c4/train@0.8, /data/books/train@0.2"` -> two StreamSpec; `""` -> [].

    Either every stream has a proportion or none has; proportions must be > 0.
    """
    streams = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        path, sep, weight = item.rpartition("@")
        if not sep:
            streams.append(StreamSpec(item))
            continue
        try:
            proportion = float(weight)
        except ValueError:
            expected = "expected PATH@PROPORTION with a number after '@'"
            raise ValueError(f"stream {item!r}: {expected}, got {weight!r}") from None
        if not path or proportion <= 0:
            raise ValueError(f"stream {item!r}: expected PATH@PROPORTION with a path and a proportion > 0")
        streams.append(StreamSpec(path, proportion))
    if streams and len({s.proportion is None for s in streams}) > 1:
        raise ValueError(f"{spec!r}: give a @PROPORTION to every stream or to none")
    if len({s.path for s in streams}) < len(streams):
        raise ValueError(f"{spec!r}: a stream is listed twice")
    return streams
