"""Synthetic knowledge-graph worlds, BM25 search and a scripted search agent: offline LongTraceRL data."""
