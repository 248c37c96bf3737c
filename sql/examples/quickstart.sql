-- flumen quickstart: the bundled data in data/, no server needed.
--   cargo run --release -- run sql/examples/quickstart.sql
-- Joins orders with users, aggregates with ROLLUP and CUBE, writes partitioned Parquet to
-- ${OUT}/ (default out/quickstart) and prints the top of the result.

CREATE EXTERNAL TABLE users STORED AS CSV LOCATION '${DATA:-data}/users.csv'
  OPTIONS ('has_header' 'true');

CREATE EXTERNAL TABLE orders STORED AS CSV LOCATION '${DATA:-data}/orders.csv'
  OPTIONS ('has_header' 'true');

CREATE EXTERNAL TABLE events STORED AS JSON LOCATION '${DATA:-data}/events.ndjson';

-- Monthly revenue per country and order status, with subtotals per country and a grand total.
COPY (
  SELECT coalesce(u.country, 'ALL')                 AS country,
         coalesce(o.status, 'ALL')                  AS status,
         count(*)                                   AS orders,
         CAST(sum(o.amount) AS DECIMAL(18, 2))      AS revenue,
         count(DISTINCT o.user_id)                  AS customers
  FROM orders o
  JOIN users u ON u.user_id = o.user_id
  GROUP BY ROLLUP (u.country, o.status)
) TO '${OUT:-out/quickstart}/revenue_by_country/' STORED AS PARQUET PARTITIONED BY (country);

-- Every combination of city and whether the customer is active, as one cube.
COPY (
  SELECT o.city, u.is_active, count(*) AS orders, CAST(avg(o.amount) AS DECIMAL(18, 2)) AS avg_amount
  FROM orders o JOIN users u ON u.user_id = o.user_id
  GROUP BY CUBE (o.city, u.is_active)
) TO '${OUT:-out/quickstart}/city_activity.parquet' STORED AS PARQUET;

-- Engagement: events per kind for users who ordered, read from nested JSON.
CREATE VIEW engaged AS
  SELECT e.kind, e.payload['page'] AS page, count(*) AS events
  FROM events e
  WHERE e.user_id IN (SELECT user_id FROM orders)
  GROUP BY e.kind, e.payload['page'];

-- The result: read back what was written, top countries by revenue.
SELECT country, sum(orders) AS orders, sum(revenue) AS revenue, max(customers) AS customers
FROM '${OUT:-out/quickstart}/revenue_by_country/'
WHERE status = 'ALL' AND country <> 'ALL'
GROUP BY country
ORDER BY revenue DESC
LIMIT 10;
