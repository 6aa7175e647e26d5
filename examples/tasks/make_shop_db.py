"""Build examples/tasks/shop.sqlite, the small database the example SQL task runs against.

Usage: python examples/tasks/make_shop_db.py [OUTPUT]   (default: shop.sqlite next to this script)
The content is fixed (no randomness), so the gold answers in shop_sql.jsonl stay valid; rerunning the
script replaces the file.
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

SCHEMA = """
CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT NOT NULL);
CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT NOT NULL, category TEXT NOT NULL, price REAL NOT NULL);
CREATE TABLE orders (
    id INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL REFERENCES customers(id),
    product_id INTEGER NOT NULL REFERENCES products(id),
    quantity INTEGER NOT NULL,
    placed_on TEXT NOT NULL
);
"""

CUSTOMERS = [
    (1, "Ada", "Paris"),
    (2, "Bruno", "Rome"),
    (3, "Chloe", "Paris"),
    (4, "Dmitri", "Oslo"),
    (5, "Eva", "Rome"),
    (6, "Farid", "Lyon"),
]
PRODUCTS = [
    (1, "kettle", "kitchen", 25.0),
    (2, "teapot", "kitchen", 18.5),
    (3, "lamp", "home", 40.0),
    (4, "rug", "home", 120.0),
    (5, "notebook", "office", 3.2),
    (6, "pen", "office", 1.5),
]
ORDERS = [
    (1, 1, 1, 1, "2024-01-05"),
    (2, 1, 5, 10, "2024-01-05"),
    (3, 2, 3, 2, "2024-02-11"),
    (4, 3, 2, 1, "2024-02-14"),
    (5, 3, 6, 20, "2024-03-01"),
    (6, 4, 4, 1, "2024-03-09"),
    (7, 5, 1, 2, "2024-03-15"),
    (8, 5, 5, 5, "2024-04-02"),
    (9, 1, 3, 1, "2024-04-20"),
    (10, 2, 6, 12, "2024-05-07"),
]


def build(path: Path) -> None:
    path.unlink(missing_ok=True)
    conn = sqlite3.connect(path)
    with conn:
        conn.executescript(SCHEMA)
        conn.executemany("INSERT INTO customers VALUES (?, ?, ?)", CUSTOMERS)
        conn.executemany("INSERT INTO products VALUES (?, ?, ?, ?)", PRODUCTS)
        conn.executemany("INSERT INTO orders VALUES (?, ?, ?, ?, ?)", ORDERS)
    conn.close()


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("shop.sqlite")
    build(out)
    print(f"wrote {out}")
