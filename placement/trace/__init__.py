"""Stage 1, traces: the routing-trace schema (``schema``), Parquet datasets (``dataset``: ``open_trace``,
``TraceWriter``), importers of other tools' formats (``importers``: ``import_trace``) and synthetic traces for
tests and benchmarks (``synthetic``). The lowest floor: it imports no other stage."""
