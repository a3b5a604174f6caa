"""run_all.py's stages, one module each: p1, p2, p3 and the report always; distill, compare and scst when opted in
(--with), each of these a row of the stage table (stage_table.py)."""
