"""What a person reads: the report, its HTML page, and the graph dumps (txt/json/dot/svg)."""
