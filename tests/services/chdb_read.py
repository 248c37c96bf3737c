#!/usr/bin/env python3
"""Reads a ClickHouse Native file with the real ClickHouse engine (chdb, in-process), or writes one.

Usage: chdb_read.py FILE  -- prints `DESCRIBE` (name<TAB>type per column), a line `--`,
then every row as TabSeparated.
       chdb_read.py --write FILE QUERY  -- writes the query's result to FILE as Native.
"""
import sys

import chdb

if sys.argv[1] == "--write":
    with open(sys.argv[2], "wb") as out:
        out.write(chdb.query(sys.argv[3], "Native").bytes())
    sys.exit(0)

path = sys.argv[1].replace("'", "\\'")
describe = chdb.query(f"DESCRIBE file('{path}', Native)", "TabSeparated")
print("\n".join("\t".join(l.split("\t")[:2]) for l in str(describe).strip().splitlines()))
print("--")
rows = chdb.query(f"SELECT * FROM file('{path}', Native)", "TabSeparated")
print(str(rows).rstrip("\n"))
