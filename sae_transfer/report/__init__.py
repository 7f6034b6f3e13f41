"""The base-vs-chat report: HTML + Markdown built from the DuckDB catalog only."""
