"""The demo's task: text-to-SQL over a small shop database the demo generates itself.

Design. The base model has seen SQL in pre-training but not *this* schema, nor the house style
of the gold queries (aliases `c o oi p`, `ROUND(..., 2)` on money, `BETWEEN` on ISO dates), so it
starts low and a few hundred examples teach it. Each question comes from a template: a question
pattern, a SQL pattern and a sampler that draws values (a city, a category, a date range, a
customer...) from the generated data. Some templates are held out of training entirely; each of
them composes skills that seen templates teach one at a time (e.g. `HAVING` on a filtered table,
`COUNT(DISTINCT ...)` keyed by a customer rather than a product), so the unseen group measures
generalisation rather than recall. Seen templates contribute evaluation questions too, with values
never used in training.

Contract:
- `build_shop_database(path, seed)` writes the same bytes for the same seed (same SQLite library).
- Every question kept by `sample_questions` has gold SQL that executes on a read-only connection and
  returns a non-degenerate result: at least one row, not a lone 0 or NULL, and, when it ends in
  `LIMIT n`, no tie on the sort key (selected last) between row n and row n+1 - otherwise a correct
  query with another tie-break would be scored wrong. Within a template no two questions share SQL,
  and not all of a template's questions share one result (the answer depends on the values).
- Prompt format (`format_prompt`):
  "-- SQLite schema\\n<CREATE TABLE ...>\\n-- Question: <q>\\n-- SQL:\\n";
  the completion is the gold SQL followed by ";\\n".
"""

from __future__ import annotations

import datetime as dt
import random
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from keepmix.errors import KeepmixError

SCHEMA_SQL = (
    "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, city TEXT, joined_year INTEGER);\n"
    "CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT, category TEXT, price REAL);\n"
    "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER REFERENCES customers(id), "
    "order_date TEXT, status TEXT);\n"
    "CREATE TABLE order_items (order_id INTEGER REFERENCES orders(id), "
    "product_id INTEGER REFERENCES products(id), quantity INTEGER);"
)

FIRST_NAMES = (
    "Olivia Liam Emma Noah Ava Ethan Sophia Lucas Mia Mason Isabella Logan Amelia James Harper "
    "Benjamin Evelyn Elijah Abigail Henry Emily Daniel Ella Samuel Grace David Chloe Joseph Nora "
    "Carter Lily Owen Zoe Wyatt Hannah Julian Aria Leo Maya Isaac"
).split()
LAST_NAMES = (
    "Smith Johnson Garcia Miller Davis Rodriguez Martinez Hernandez Lopez Gonzalez Wilson Anderson "
    "Thomas Taylor Moore Jackson Martin Lee Perez Thompson White Harris Sanchez Clark Ramirez "
    "Lewis Robinson Walker Young Allen King Wright Scott Torres Nguyen Hill Flores Green Adams "
    "Nelson"
).split()
# City -> relative size, so per-city counts differ the way real customer bases do.
CITIES = {
    "Seattle": 9, "Chicago": 9, "Austin": 8, "Boston": 7, "Denver": 7, "Atlanta": 6, "Portland": 6,
    "Phoenix": 6, "Miami": 5, "San Diego": 5, "Nashville": 5, "Minneapolis": 4, "Detroit": 4,
    "Pittsburgh": 4, "Sacramento": 3, "Baltimore": 3,
}
# Category -> (lowest price, highest price, product names).
CATALOG = {
    "Books": (8, 45, ["Mystery Novel", "Cookbook", "Travel Guide", "Poetry Collection",
                      "Science Fiction Novel", "History of Rome", "Picture Book", "Graphic Novel"]),
    "Electronics": (15, 400, ["Wireless Earbuds", "USB-C Charger", "Mechanical Keyboard",
                              "Bluetooth Speaker", "Webcam", "27-inch Monitor", "Portable SSD",
                              "Smartwatch"]),
    "Kitchen": (6, 150, ["Chef Knife", "Cast Iron Skillet", "French Press", "Cutting Board",
                         "Stand Mixer", "Measuring Cups", "Rice Cooker", "Tea Kettle"]),
    "Garden": (5, 120, ["Garden Hose", "Pruning Shears", "Raised Bed Kit", "Watering Can",
                        "Seed Starter Tray", "Leaf Rake", "Bird Feeder", "Solar Path Lights"]),
    "Toys": (5, 80, ["Building Blocks", "Jigsaw Puzzle", "Remote Control Car", "Plush Bear",
                     "Board Game", "Yo-Yo", "Model Train Set", "Kite"]),
    "Sports": (8, 250, ["Yoga Mat", "Tennis Racket", "Running Shoes", "Dumbbell Set", "Basketball",
                        "Cycling Helmet", "Jump Rope", "Camping Tent"]),
    "Beauty": (4, 70, ["Face Moisturizer", "Shampoo", "Lip Balm", "Sunscreen SPF 50", "Hair Dryer",
                       "Nail Polish Set", "Body Lotion", "Perfume"]),
    "Clothing": (10, 180, ["Denim Jacket", "Wool Sweater", "Rain Coat", "Cotton T-Shirt",
                           "Hiking Socks", "Chino Pants", "Winter Gloves", "Baseball Cap"]),
    "Music": (6, 600, ["Acoustic Guitar", "Guitar Strings", "Digital Piano", "Ukulele",
                       "Drum Sticks", "Harmonica", "Studio Headphones", "Microphone Stand"]),
    "Office": (2, 300, ["Desk Lamp", "Notebook Pack", "Gel Pens", "Office Chair", "Stapler",
                        "Paper Shredder", "Whiteboard", "Desk Organizer"]),
    "Pet Supplies": (4, 90, ["Dog Leash", "Cat Tree", "Pet Bed", "Chew Toy", "Aquarium Filter",
                             "Bird Cage", "Cat Litter", "Dog Shampoo"]),
    "Grocery": (2, 30, ["Coffee Beans", "Olive Oil", "Dark Chocolate", "Green Tea", "Maple Syrup",
                        "Pasta", "Honey", "Almonds"]),
}
N_CUSTOMERS, N_ORDERS = 300, 1500
FIRST_DAY, LAST_DAY = dt.date(2021, 1, 1), dt.date(2024, 12, 31)
MONTHS = ("January February March April May June July August September October November "
          "December").split()


@dataclass(frozen=True)
class ShopFacts:
    """What the samplers draw values from: names and ranges present in the generated database."""

    cities: list[str]
    categories: list[str]
    statuses: list[str]
    customers: list[str]
    products: list[str]
    price_bounds: dict[str, tuple[float, float]]  # category -> (cheapest, dearest)


@dataclass(frozen=True)
class Template:
    """A question family: `question` and `sql` are str.format patterns over the sampled values."""

    name: str
    question: str
    sql: str
    sample: Callable[[random.Random, ShopFacts], dict]


@dataclass(frozen=True)
class SqlQuestion:
    template: str
    question: str
    sql: str
    result: tuple  # the gold rows, kept to check that answers vary with the values


def _date_range(r: random.Random) -> dict:
    start = FIRST_DAY + dt.timedelta(days=r.randrange((LAST_DAY - FIRST_DAY).days - 30))
    end = min(LAST_DAY, start + dt.timedelta(days=r.randint(30, 240)))
    return {"start": start.isoformat(), "end": end.isoformat()}


def _month(r: random.Random) -> dict:
    month = r.randint(1, 12)
    return {"month_name": MONTHS[month - 1], "mm": f"{month:02d}", "year": r.randint(2021, 2024)}


def _price_in(r: random.Random, f: ShopFacts, category: str) -> int:
    low, high = f.price_bounds[category]
    return r.randint(int(low) + 1, int(high))


def _category_price(r: random.Random, f: ShopFacts) -> dict:
    category = r.choice(f.categories)
    return {"category": category, "price": _price_in(r, f, category)}


_SPEND = ("FROM customers c JOIN orders o ON o.customer_id = c.id "
          "JOIN order_items oi ON oi.order_id = o.id JOIN products p ON p.id = oi.product_id")

SQL_TEMPLATES: list[Template] = [
    Template("customers_in_city_since",
             "How many customers from {city} joined in {year} or later?",
             "SELECT COUNT(*) FROM customers WHERE city = '{city}' AND joined_year >= {year}",
             lambda r, f: {"city": r.choice(f.cities), "year": r.randint(2015, 2024)}),
    Template("category_products_under_price",
             "Which {category} products cost less than ${price}? List them cheapest first.",
             "SELECT name FROM products WHERE category = '{category}' AND price < {price} "
             "ORDER BY price",
             _category_price),
    Template("most_expensive_in_category",
             "What are the {n} most expensive products in the {category} category?",
             "SELECT name, price FROM products WHERE category = '{category}' "
             "ORDER BY price DESC LIMIT {n}",
             lambda r, f: {"category": r.choice(f.categories), "n": r.randint(2, 6)}),
    Template("orders_with_status_between",
             "How many orders with status '{status}' were placed between {start} and {end}?",
             "SELECT COUNT(*) FROM orders WHERE status = '{status}' "
             "AND order_date BETWEEN '{start}' AND '{end}'",
             lambda r, f: {"status": r.choice(f.statuses), **_date_range(r)}),
    Template("orders_of_customer",
             "How many orders has {customer} placed?",
             "SELECT COUNT(*) FROM orders o JOIN customers c ON c.id = o.customer_id "
             "WHERE c.name = '{customer}'",
             lambda r, f: {"customer": r.choice(f.customers)}),
    Template("revenue_by_category_in_month",
             "What was the total revenue of each product category in {month_name} {year}?",
             "SELECT p.category, ROUND(SUM(oi.quantity * p.price), 2) AS revenue "
             "FROM order_items oi JOIN orders o ON o.id = oi.order_id "
             "JOIN products p ON p.id = oi.product_id "
             "WHERE o.order_date BETWEEN '{year}-{mm}-01' AND '{year}-{mm}-31' GROUP BY p.category",
             lambda r, f: _month(r)),
    Template("city_customers_with_many_orders",
             "Which customers from {city} have placed more than {n} orders?",
             "SELECT c.name FROM customers c JOIN orders o ON o.customer_id = c.id "
             "WHERE c.city = '{city}' GROUP BY c.id, c.name HAVING COUNT(*) > {n}",
             lambda r, f: {"city": r.choice(f.cities), "n": r.randint(2, 7)}),
    Template("distinct_buyers_of_product",
             "How many different customers have bought the {product}?",
             "SELECT COUNT(DISTINCT o.customer_id) FROM orders o "
             "JOIN order_items oi ON oi.order_id = o.id JOIN products p ON p.id = oi.product_id "
             "WHERE p.name = '{product}'",
             lambda r, f: {"product": r.choice(f.products)}),
    Template("city_customers_without_status",
             "Which customers from {city} have never had an order with status '{status}'?",
             "SELECT name FROM customers WHERE city = '{city}' "
             "AND id NOT IN (SELECT customer_id FROM orders WHERE status = '{status}')",
             lambda r, f: {"city": r.choice(f.cities), "status": r.choice(f.statuses)}),
    Template("top_spenders_in_city",
             "Who are the top {n} customers from {city} by total amount spent?",
             f"SELECT c.name, ROUND(SUM(oi.quantity * p.price), 2) AS total {_SPEND} "
             "WHERE c.city = '{city}' GROUP BY c.id, c.name ORDER BY total DESC LIMIT {n}",
             lambda r, f: {"city": r.choice(f.cities), "n": r.randint(2, 5)}),
    Template("categories_with_cheap_products",
             "Which categories have at least {n} products priced under ${price}?",
             "SELECT category FROM products WHERE price < {price} GROUP BY category "
             "HAVING COUNT(*) >= {n}",
             lambda r, f: {"n": r.randint(2, 6), "price": r.randrange(10, 155, 5)}),
    Template("average_quantity_in_category_year",
             "What is the average quantity per order line of {category} products in {year}?",
             "SELECT ROUND(AVG(oi.quantity), 2) FROM order_items oi "
             "JOIN products p ON p.id = oi.product_id JOIN orders o ON o.id = oi.order_id "
             "WHERE p.category = '{category}' "
             "AND o.order_date BETWEEN '{year}-01-01' AND '{year}-12-31'",
             lambda r, f: {"category": r.choice(f.categories), "year": r.randint(2021, 2024)}),
    # Held out by default: each composes two skills that the templates above teach separately.
    Template("cities_with_many_recent_customers",
             "Which cities have more than {n} customers who joined in {year} or later?",
             "SELECT city FROM customers WHERE joined_year >= {year} GROUP BY city "
             "HAVING COUNT(*) > {n}",
             lambda r, f: {"year": r.randint(2015, 2022), "n": r.randint(2, 15)}),
    Template("distinct_products_of_customer",
             "How many different products has {customer} ordered?",
             "SELECT COUNT(DISTINCT oi.product_id) FROM order_items oi "
             "JOIN orders o ON o.id = oi.order_id JOIN customers c ON c.id = o.customer_id "
             "WHERE c.name = '{customer}'",
             lambda r, f: {"customer": r.choice(f.customers)}),
    Template("total_spent_by_customer",
             "How much has {customer} spent in total?",
             f"SELECT ROUND(SUM(oi.quantity * p.price), 2) {_SPEND} WHERE c.name = '{{customer}}'",
             lambda r, f: {"customer": r.choice(f.customers)}),
    Template("cheapest_in_category_above_price",
             "What are the {n} cheapest {category} products that cost more than ${price}?",
             "SELECT name, price FROM products WHERE category = '{category}' AND price > {price} "
             "ORDER BY price LIMIT {n}",
             lambda r, f: {**_category_price(r, f), "n": r.randint(2, 4)}),
]
DEFAULT_UNSEEN_TEMPLATES = ("cities_with_many_recent_customers", "distinct_products_of_customer",
                            "total_spent_by_customer", "cheapest_in_category_above_price")


def format_prompt(question: str) -> str:
    """The prompt for one question; the model's answer is the SQL up to the first ';'."""
    return f"-- SQLite schema\n{SCHEMA_SQL}\n-- Question: {question}\n-- SQL:\n"


def open_read_only(path: Path) -> sqlite3.Connection:
    """A connection that cannot modify the database: how generated SQL should be executed."""
    return sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)


def _prices(rng: random.Random) -> dict[str, list[float]]:
    """Category -> one price per product; all prices distinct, so ORDER BY price has no ties."""
    taken: set[float] = set()
    prices = {}
    for category, (low, high, names) in CATALOG.items():
        prices[category] = []
        while len(prices[category]) < len(names):
            # Squared uniform: most products cheap, a few dear, like a real catalogue.
            dollars = int(low + (high - low) * rng.random() ** 2)
            price = dollars + rng.choice((0.99, 0.49, 0.0, 0.95))
            if price not in taken:
                taken.add(price)
                prices[category].append(price)
    return prices


def build_shop_database(path: Path, seed: int) -> ShopFacts:
    """Write the shop database at `path` (replacing it), seeded by `seed`; return its facts."""
    rng = random.Random(f"shop/{seed}")
    names = [f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES]
    customers = [(i + 1, name, rng.choices(list(CITIES), weights=list(CITIES.values()))[0],
                  rng.randint(2015, 2024)) for i, name in enumerate(rng.sample(names, N_CUSTOMERS))]
    prices = _prices(rng)
    products = [(i + 1, name, category, price) for i, (category, name, price) in enumerate(
        (c, n, p) for c, (_, _, ns) in CATALOG.items() for n, p in zip(ns, prices[c]))]

    # Heavy-tailed customer and product popularity: a few regulars and best-sellers.
    buyer_weights = [rng.paretovariate(1.5) for _ in customers]
    product_weights = [rng.paretovariate(1.2) for _ in products]
    dated = []
    for buyer in rng.choices(customers, weights=buyer_weights, k=N_ORDERS):
        first = max(FIRST_DAY, dt.date(buyer[3], 1, 1))
        day = first + dt.timedelta(days=rng.randrange((LAST_DAY - first).days + 1))
        dated.append((day, buyer[0]))
    orders, items = [], []
    for order_id, (day, customer_id) in enumerate(sorted(dated), start=1):
        if (LAST_DAY - day).days < 45:
            status = rng.choices(("processing", "shipped", "delivered"), weights=(4, 4, 2))[0]
        else:
            status = rng.choices(("delivered", "cancelled", "returned"), weights=(80, 12, 8))[0]
        orders.append((order_id, customer_id, day.isoformat(), status))
        lines = {rng.choices(products, weights=product_weights)[0][0]
                 for _ in range(rng.randint(1, 4))}
        items += [(order_id, pid, rng.choices((1, 2, 3, 4, 5), weights=(50, 25, 12, 8, 5))[0])
                  for pid in sorted(lines)]

    path.unlink(missing_ok=True)
    con = sqlite3.connect(path)
    try:
        con.executescript(SCHEMA_SQL)
        con.executemany("INSERT INTO customers VALUES (?, ?, ?, ?)", customers)
        con.executemany("INSERT INTO products VALUES (?, ?, ?, ?)", products)
        con.executemany("INSERT INTO orders VALUES (?, ?, ?, ?)", orders)
        con.executemany("INSERT INTO order_items VALUES (?, ?, ?)", items)
        con.commit()
    finally:
        con.close()
    return ShopFacts(
        cities=sorted({c[2] for c in customers}), categories=list(CATALOG),
        statuses=sorted({o[3] for o in orders}), customers=sorted(c[1] for c in customers),
        products=[p[1] for p in products],
        price_bounds={c: (min(ps), max(ps)) for c, ps in prices.items()})


_LIMIT = re.compile(r"\sLIMIT (\d+)$")


def gold_result(con: sqlite3.Connection, sql: str) -> tuple | None:
    """The gold rows of `sql`, or None when they make a degenerate or ambiguous question."""
    rows = tuple(con.execute(sql).fetchall())
    if not rows or (len(rows) == 1 and all(v in (0, None) for v in rows[0])):
        return None
    limit = _LIMIT.search(sql)
    if limit:
        n = int(limit.group(1))
        unlimited = con.execute(sql[:limit.start()]).fetchall()
        if len(unlimited) > n and unlimited[n - 1][-1] == unlimited[n][-1]:
            return None
    return rows


def sample_questions(db_path: Path, facts: ShopFacts, counts: dict[str, int], seed: int,
                     templates: list[Template] = SQL_TEMPLATES) -> dict[str, list[SqlQuestion]]:
    """Template name -> `counts[name]` distinct, validated questions, in sampling order.

    Each template draws from its own RNG (seed, name), so changing one template's count leaves the
    others' questions unchanged. Gold SQL runs on a read-only connection to `db_path`.
    """
    by_name = {t.name: t for t in templates}
    out = {}
    con = open_read_only(db_path)
    try:
        for name, wanted in counts.items():
            template, rng = by_name[name], random.Random(f"sql/{seed}/{name}")
            kept: dict[str, SqlQuestion] = {}
            for _ in range(60 * wanted):
                if len(kept) == wanted:
                    break
                values = template.sample(rng, facts)
                sql = template.sql.format(**values)
                if sql in kept:
                    continue
                result = gold_result(con, sql)
                if result is not None:
                    kept[sql] = SqlQuestion(name, template.question.format(**values), sql, result)
            if len(kept) < wanted:
                raise KeepmixError(
                    f"SQL template '{name}' gave only {len(kept)} distinct questions with a "
                    f"non-degenerate answer on {db_path}; {wanted} were asked for. Ask for fewer "
                    "SQL examples (sql_train / sql_eval_seen / sql_eval_unseen).")
            if wanted > 1 and len({q.result for q in kept.values()}) == 1:
                raise KeepmixError(f"SQL template '{name}' gives the same answer for every sampled "
                                   f"value on {db_path}; its questions would be guessable.")
            out[name] = list(kept.values())
    finally:
        con.close()
    return out
