#!/usr/bin/env python3
"""Reads a ClickHouse Native file with the real ClickHouse engine (chdb, in-process).

Usage: chdb_read.py FILE  -- prints `DESCRIBE` (name<TAB>type per column), a line `--`,
then every row as TabSeparated.
"""
import sys

import chdb

path = sys.argv[1].replace("'", "\\'")
describe = chdb.query(f"DESCRIBE file('{path}', Native)", "TabSeparated")
print("\n".join("\t".join(l.split("\t")[:2]) for l in str(describe).strip().splitlines()))
print("--")
rows = chdb.query(f"SELECT * FROM file('{path}', Native)", "TabSeparated")
print(str(rows).rstrip("\n"))
